"""``python -m rewriter.cli``: the same as the ``rewriter`` console script."""

from .main import main

if __name__ == "__main__":
    main()
