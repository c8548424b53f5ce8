"""The ``rewriter`` command line (``rewriter apply``, ``rewriter passes``, ``rewriter info``)."""

from .main import cli, main

__all__ = ["cli", "main"]
