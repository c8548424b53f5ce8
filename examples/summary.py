"""What the examples share: the recorded summary, progress bars, argument parsing.

Every example prints a *summary* (the lines the README quotes) through :class:`Summary`.
Run with its default arguments, an example also writes the summary to
``examples/outputs/<example>.txt``; ``tests/test_readme.py`` checks that every README
block marked ``<!-- example-output: <example> -->`` matches that file line for line,
so a changed number fails the test until the README is updated. Run with other
arguments, the summary goes to ``out/<example>.txt`` instead (the recorded file keeps
the defaults' numbers). ``REWRITER_EXAMPLE_OUTPUTS=<dir>`` redirects the recorded
summaries (``examples/check_outputs.py`` uses it to re-run examples and compare).

Progress bars are ``tqdm`` on stderr (one library across the project); they never go
into the summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
RECORDED = ROOT / "outputs"
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """``add_argument`` appends ``(default: ...)`` to every option's help."""

    def add_argument(self, *args: Any, **kw: Any) -> argparse.Action:  # type: ignore[override]
        if args and str(args[0]).startswith("-") and kw.get("action") not in ("help", "version"):
            text = kw.get("help") or ""
            if "%(default)" not in text:
                kw["help"] = f"{text} (default: %(default)s)".strip()
        return super().add_argument(*args, **kw)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the docstring's first line and every default."""
    first = (doc or "").strip().splitlines()[0] if doc else None
    return _Parser(description=first)


def progress(items: Iterable[T], desc: str, total: int | None = None, **kw: Any) -> Iterable[T]:
    """A ``tqdm`` progress bar on stderr; ``REWRITER_PROGRESS=0`` turns it off."""
    disable = os.environ.get("REWRITER_PROGRESS") == "0"
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, disable=disable, **kw)


class Summary:
    """Prints summary lines and records them (see the module docs)."""

    def __init__(self, name: str, ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        self.name = name
        self.lines: list[str] = []
        self.default = vars(args) == vars(ap.parse_args([]))

    def print(self, text: str = "") -> None:
        """Print ``text`` (one or more lines) and add it to the summary."""
        print(text, flush=True)
        self.lines.extend(text.splitlines() or [""])

    def path(self) -> Path:
        if self.default:
            folder = Path(os.environ.get("REWRITER_EXAMPLE_OUTPUTS", RECORDED))
        else:
            folder = Path("out")
        return folder / f"{self.name}.txt"

    def save(self) -> Path:
        """Write the summary; returns where it went."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines) + "\n")
        kind = "recorded summary" if self.default else "summary (non-default arguments)"
        print(f"{kind} written to {path}", file=sys.stderr)
        return path
