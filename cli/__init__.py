"""The ``rewriter`` command line: ``apply``, ``check``, ``inspect``, ``export``, ``passes``, ``info``."""

from .main import cli, main

__all__ = ["cli", "main"]
