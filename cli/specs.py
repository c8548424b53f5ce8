"""Parsing of the CLI's ``NAME:key=value,...`` pass specs and ``key=value`` options.

Values are TOML literals when they parse as one (``rate=0.5``, ``flag=true``,
``exclude=["fc", "layer1.*"]``) and plain strings otherwise (``init=paper``).
An option declared as a string keeps its text even when it looks like a number
or a boolean, so ``name=true`` gives the string ``"true"`` to a ``str`` option.
"""

from __future__ import annotations

import datetime
import tomllib
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

import click

import rewriter
from rewriter.registry import OptionSpec

_OPEN, _CLOSE = "[{(", "]})"


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` at ``sep`` outside brackets, braces, parentheses and quotes."""
    parts: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    escaped = False
    for ch in text:
        if quote is not None:
            buf.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise click.BadParameter(f"unbalanced {ch!r} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    if quote is not None:
        raise click.BadParameter(f"unclosed {quote} quote in {text!r}")
    if depth:
        raise click.BadParameter(f"unclosed bracket in {text!r}")
    parts.append("".join(buf))
    return parts


def parse_value(text: str) -> Any:
    """A TOML literal's value (``0.5``, ``true``, ``["fc"]``), else ``text`` itself, stripped."""
    text = text.strip()
    try:
        document = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise click.BadParameter(f"value {text[:40]!r}... is nested too deeply") from None
    value = document.get("v")
    if set(document) != {"v"} or isinstance(value, (datetime.date, datetime.time)):
        return text  # several keys, or a TOML date: keep the user's text
    return value


def split_key_value(item: str, what: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``, or a clear ``BadParameter``."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise click.BadParameter(f"expected key=value in {what}, got {item.strip()!r}")
    return key, value


def parse_key_values(items: Iterable[str], what: str) -> dict[str, str]:
    """Raw ``{key: text}`` from ``key=value`` items; duplicate keys are an error."""
    out: dict[str, str] = {}
    for item in items:
        key, value = split_key_value(item, what)
        if key in out:
            raise click.BadParameter(f"option {key!r} given twice in {what}")
        out[key] = value
    return out


def split_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"masks:exclude=[\\"fc\\"],classes=Conv2d"`` -> ``("masks", {key: raw text})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise click.BadParameter(f"pass spec {spec!r} has no pass name; use NAME[:key=value,...]")
    if not rest.strip():
        return name, {}
    items = split_top_level(rest)
    if any(not item.strip() for item in items):
        raise click.BadParameter(f"empty option in pass spec {spec!r}")
    return name, parse_key_values(items, f"pass spec {spec!r}")


def _wants_string(spec: OptionSpec | None) -> bool:
    if spec is None:
        return False
    if spec.type is str:
        return True
    return get_origin(spec.type) is Literal and all(isinstance(a, str) for a in get_args(spec.type))


def pass_from_spec(spec: str) -> rewriter.Pass:
    """The pass object for a CLI pass spec; unknown names or options raise ``OptionError``."""
    name, raw = split_pass_spec(spec)
    specs = {s.name: s for s in rewriter.option_specs(rewriter.get_pass(name))}
    options = {}
    for key, text in raw.items():
        value = parse_value(text)
        if _wants_string(specs.get(key)) and not isinstance(value, str):
            value = text.strip()
        options[key] = value
    return rewriter.make_pass((name, options))


__all__ = [
    "parse_key_values",
    "parse_value",
    "pass_from_spec",
    "split_key_value",
    "split_pass_spec",
    "split_top_level",
]
