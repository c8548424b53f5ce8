"""Errors raised by rewriter. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class RewriterError(Exception):
    """Base class of every error the library raises on purpose."""


class OptionError(RewriterError, ValueError):
    """A pass name or option is unknown or has the wrong type."""


class TraceError(RewriterError):
    """A model could not be traced into a torch.fx graph at all."""


class PassError(RewriterError):
    """A pass failed or broke one of the engine's checks.

    Attributes name the pass, the node and the rule involved (``None`` when not
    applicable) and the passes that ran successfully before it.
    """

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        history: list[str],
        node: str | None = None,
        rule: str | None = None,
    ) -> None:
        self.pass_name = pass_name
        self.history = list(history)
        self.node = node
        self.rule = rule
        where = [f"pass {pass_name!r}"]
        if rule is not None:
            where.append(f"rule {rule!r}")
        if node is not None:
            where.append(f"node {node!r}")
        ran = ", ".join(repr(h) for h in history) if history else "none"
        super().__init__(f"{message}\n  in {', '.join(where)}\n  passes already run: {ran}")


class ArtifactError(RewriterError):
    """A saved artifact or weights file is missing, malformed or does not match its model."""


class OutputExistsError(ArtifactError):
    """An output file exists and replacing it was not allowed (``force=False``)."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(f"{path} already exists; pass force=True to replace it")

    def cli_message(self) -> str:
        return f"{self.path} already exists; pass --force to replace it"


class OutputWriteError(ArtifactError, OSError):
    """Writing an output failed (unwritable directory, full disk); also an ``OSError``."""


class UnsafeFileError(ArtifactError):
    """A file would run code, unpickle objects or exhaust resources when read; refused."""
