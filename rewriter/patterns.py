"""Patterns and rules as data.

A :class:`Pattern` is frozen data: which op (``call_module`` matched by module
class with ``isinstance``, ``call_function`` by function identity,
``call_method`` by name), sub-patterns for the positional arguments, a name to
bind the matched node to, and an optional scope (a glob over the qualified
names of the modules the node was traced inside). A rule is a pattern plus a
builder ``builder(ctx, match) -> Node | None``; ``None`` means "does not apply".

Rule tables read like the rewrites they perform::

    RBN_RULES = [
        (P.module(nn.BatchNorm2d, name="bn"), to_rbn),   # bn(x) -> rbn(x)
    ]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from torch import fx

from .tracing import owning_modules

if TYPE_CHECKING:
    from .context import RewriteContext

Builder = Callable[["RewriteContext", "Match"], "fx.Node | None"]


@dataclass(frozen=True)
class Pattern:
    """One node pattern. ``op=None`` matches any node (a wildcard)."""

    op: str | None = None
    targets: tuple[Any, ...] = ()
    src: tuple[Pattern | None, ...] | None = None
    name: str | None = None
    scope: str | None = None

    def match(self, node: fx.Node, gm: fx.GraphModule) -> dict[str, fx.Node] | None:
        """Return the bound nodes (``{name: node}``) or ``None`` when no match."""
        bound: dict[str, fx.Node] = {}
        return bound if self._match(node, gm, bound) else None

    def _match(self, node: Any, gm: fx.GraphModule, bound: dict[str, fx.Node]) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if self.op is not None and node.op != self.op:
            return False
        if self.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if self.targets and not isinstance(module, self.targets):
                return False
        elif self.op in ("call_function", "call_method") and self.targets:
            if not any(node.target is t or node.target == t for t in self.targets):
                return False
        if self.scope is not None and not any(
            fnmatchcase(m, self.scope) for m in owning_modules(node)
        ):
            return False
        if self.src is not None:
            if len(node.args) < len(self.src):
                return False
            for sub, arg in zip(self.src, node.args, strict=False):
                if sub is not None and not sub._match(arg, gm, bound):
                    return False
        if self.name is not None:
            if self.name in bound and bound[self.name] is not node:
                return False
            bound[self.name] = node
        return True


class P:
    """Pattern constructors: ``P.module``, ``P.function``, ``P.method``, ``P.any``."""

    @staticmethod
    def module(
        *classes: type,
        name: str | None = None,
        src: Sequence[Pattern | None] | None = None,
        scope: str | None = None,
    ) -> Pattern:
        return Pattern("call_module", tuple(classes), _src(src), name, scope)

    @staticmethod
    def function(
        *functions: Callable[..., Any],
        name: str | None = None,
        src: Sequence[Pattern | None] | None = None,
        scope: str | None = None,
    ) -> Pattern:
        return Pattern("call_function", tuple(functions), _src(src), name, scope)

    @staticmethod
    def method(
        *names: str,
        name: str | None = None,
        src: Sequence[Pattern | None] | None = None,
        scope: str | None = None,
    ) -> Pattern:
        return Pattern("call_method", tuple(names), _src(src), name, scope)

    @staticmethod
    def any(name: str | None = None, scope: str | None = None) -> Pattern:
        return Pattern(None, (), None, name, scope)


def _src(src: Sequence[Pattern | None] | None) -> tuple[Pattern | None, ...] | None:
    return None if src is None else tuple(src)


@dataclass(frozen=True)
class Match:
    """The node a rule matched (``root``) and the nodes bound by name."""

    root: fx.Node
    nodes: dict[str, fx.Node]

    def __getitem__(self, name: str) -> fx.Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(
                f"pattern bound no node named {name!r}; bound: {sorted(self.nodes)}"
            ) from None


@dataclass(frozen=True)
class Rule:
    """A pattern and the builder that rewrites what it matches."""

    pattern: Pattern
    builder: Builder
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or getattr(self.builder, "__name__", "rule")


def as_rule(item: Rule | tuple[Pattern, Builder]) -> Rule:
    """Accept a :class:`Rule` or a ``(pattern, builder)`` pair from a rule table."""
    if isinstance(item, Rule):
        return item
    pattern, builder = item
    return Rule(pattern, builder, getattr(builder, "__name__", "rule"))
