"""The pass registry and the :class:`Pass` base class.

A pass is a frozen dataclass: its fields are its options. The registry maps the
pass's ``name`` (the same in Python, TOML and the CLI) to its class; options are
described, coerced and validated from the dataclass fields, so every front end
shares one schema.

Every option has a *domain* (``option(default, help, domain=positive())``): the
values it accepts, checked for Python, TOML and the CLI alike (a registered pass
checks its options when it is constructed, so ``SynFlow(iterations=-1)`` fails
like ``--pass synflow:iterations=-1``). A float option without a declared domain
must still be finite. Some domains carry a *limit*: an upper bound that guards
against runaway resource use (``synflow:iterations`` above 10,000) rather than
a mathematical constraint; :func:`option_limits` (CLI: ``--allow-large-options``)
lifts those. :data:`LIMITS` holds the other resource limits (passes per
pipeline, elements of an example input).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Iterator
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


# -- domains ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """The values an option accepts. Subclasses implement :meth:`problem` and :meth:`describe`.

    For a list option (``tuple[...]``) the domain applies to every element.
    """

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` is allowed, else what is wrong (``"got nan"``)."""
        return None

    def describe(self) -> str:
        return "any value"


@dataclass(frozen=True)
class Anything(Domain):
    """Every value of the option's type (strings, globs, booleans)."""


@dataclass(frozen=True)
class Range(Domain):
    """A finite number between ``low`` and ``high`` (either may be open or absent).

    ``integer`` requires a whole number. ``limit`` is an upper bound that exists to
    bound resource use, not because larger values are meaningless; it is lifted by
    :func:`option_limits`.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    limit: float | None = None

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"got {value!r}, not a number"
        if not math.isfinite(value):
            return f"got {value}"
        if self.integer and value != int(value):
            return f"got {value}, not an integer"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if below or above:
            return f"got {value}"
        if self.limit is not None and value > self.limit and LIMITS.options:
            return (
                f"got {value}, above the limit {_number(self.limit)} that guards against "
                "runaway resource use (raise it on the CLI with --allow-large-options, in "
                "Python with `with rewriter.option_limits(False):`)"
            )
        return None

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = kind
        if self.limit is not None:
            text += f" (limit {_number(self.limit)})"
        return text


@dataclass(frozen=True)
class Choices(Domain):
    """One of a fixed set of values."""

    values: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"got {value!r}"

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def anything() -> Domain:
    """Any value of the option's type (strings, globs, booleans, seeds)."""
    return Anything()


def finite() -> Domain:
    """Any finite number."""
    return Range()


def positive(*, limit: float | None = None) -> Domain:
    """A finite number > 0."""
    return Range(0, low_open=True, limit=limit)


def nonnegative(*, limit: float | None = None) -> Domain:
    """A finite number >= 0."""
    return Range(0, limit=limit)


def unit_interval(*, low_open: bool = False, high_open: bool = False) -> Domain:
    """A number in [0, 1]; ``low_open``/``high_open`` exclude the ends ((0, 1] is a keep rate)."""
    return Range(0, 1, low_open=low_open, high_open=high_open)


def between(low: float, high: float, *, integer: bool = False) -> Domain:
    """A number in [low, high]."""
    return Range(low, high, integer=integer)


def at_least(n: int, *, limit: float | None = None) -> Domain:
    """An integer >= ``n``, optionally with a resource ``limit``."""
    return Range(n, integer=True, limit=limit)


def integer() -> Domain:
    """Any integer (seeds)."""
    return Range(integer=True)


def choices(*values: Any) -> Domain:
    """One of ``values``."""
    return Choices(tuple(values))


@dataclass
class Limits:
    """Resource limits that a file cannot raise by itself (the user can).

    ``max_passes``: passes in one pipeline or artifact; ``max_input_elements``:
    elements of one example input (``batch * prod(shape)``); ``options``: whether
    option domains' ``limit`` bounds apply.
    """

    max_passes: int = 64
    max_input_elements: int = 1 << 26
    options: bool = True


LIMITS = Limits()


@contextlib.contextmanager
def option_limits(enabled: bool = True, **limits: int) -> Iterator[Limits]:
    """Temporarily set :data:`LIMITS`: ``option_limits(False)`` lifts option limits,
    ``option_limits(max_passes=1000, max_input_elements=10**9)`` raises the others."""
    unknown = sorted(set(limits) - {f.name for f in dataclasses.fields(Limits)} - {"options"})
    if unknown:
        raise OptionError(f"unknown limits {unknown}; known: max_passes, max_input_elements")
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"limit {key} must be an integer >= 1, got {value!r}")
    saved = dataclasses.replace(LIMITS)
    LIMITS.options = enabled
    for key, value in limits.items():
        setattr(LIMITS, key, value)
    try:
        yield LIMITS
    finally:
        for f in dataclasses.fields(Limits):
            setattr(LIMITS, f.name, getattr(saved, f.name))


def option(default: Any, help: str, domain: Domain | None = None) -> Any:
    """A dataclass field with a help text (shown by ``rewriter passes`` and errors) and
    the ``domain`` of values it accepts (default: any value of its type, finite for floats)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a scalar as an option default")
    if domain is not None and not isinstance(domain, Domain):
        raise TypeError(f"domain must be a rewriter.registry.Domain, got {domain!r}")
    return dataclasses.field(default=default, metadata={"help": help, "domain": domain})


def _default_domain(tp: Any) -> Domain:
    """Floats (alone or in lists) must be finite when no domain is declared."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is float or (origin is tuple and args and args[0] is float):
        return Range()
    return Anything()


def domain_problem(spec: OptionSpec, value: Any) -> str | None:
    """``None`` when ``value`` lies in the option's domain, else a message naming the range."""
    domain = spec.domain
    values = value if isinstance(value, (tuple, list)) else (value,)
    if isinstance(domain, Choices) and value in domain.values:
        return None
    for item in values:
        if isinstance(item, str) and isinstance(domain, Range):
            continue  # a string choice of a union type ("paper" | list of floats)
        if item is None:
            continue
        wrong = domain.problem(item)
        if wrong is not None:
            return f"must be {domain.describe()}, {wrong}"
    return None


def check_options(cls: type[Pass], values: dict[str, Any]) -> list[str]:
    """Problems (``"option 'gamma' must be ..."``) with ``values`` against ``cls``'s domains."""
    specs = {s.name: s for s in option_specs(cls)}
    problems = []
    for key, value in values.items():
        if key in specs:
            wrong = domain_problem(specs[key], value)
            if wrong is not None:
                problems.append(f"option {key!r} {wrong}")
    return problems


def _checked_init(cls: type[Pass]) -> None:
    """Make ``cls(...)`` check its options' domains before the dataclass ``__init__`` runs."""
    original = cls.__dict__["__init__"]
    if getattr(original, "_rewriter_checked", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Pass, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            bound = None  # let the dataclass __init__ raise its own TypeError
        if bound is not None:
            given = {k: v for k, v in bound.arguments.items() if k != "self"}
            problems = check_options(type(self), given)
            if problems:
                raise OptionError(f"pass {type(self).name!r}: " + "; ".join(problems))
        original(self, *args, **kwargs)

    __init__._rewriter_checked = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


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
    _checked_init(cls)
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
    domain: Domain = Anything()

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def option_specs(cls: type[Pass]) -> list[OptionSpec]:
    hints = typing.get_type_hints(cls)
    return [
        OptionSpec(
            f.name,
            hints[f.name],
            f.default,
            f.metadata.get("help", ""),
            f.metadata.get("domain") or _default_domain(hints[f.name]),
        )
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
            continue
        wrong = domain_problem(specs[key], values[key])
        if wrong is not None:
            problems.append(f"option {key!r} {wrong}")
    if problems:
        raise OptionError(f"pass {name!r}: " + "; ".join(problems))
    try:
        return cls(**values)
    except OptionError:
        raise
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
