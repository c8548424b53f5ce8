"""The default real dataset: scikit-learn's handwritten digits (ships with the package).

Nothing is downloaded: ``sklearn.datasets.load_digits`` reads a file inside
scikit-learn (a dev extra: ``pip install -e ".[dev]"``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def digits(
    *, train_per_class: int | None = None, test_fraction: float = 0.3, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` with images of shape (N, 1, 8, 8) in [0, 1].

    The split is stratified and seeded; ``train_per_class`` keeps only that many
    training images of each digit (the small-data regime of Knowledge Evolution).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install -e '.[dev]'"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train = idx[n_test:]
        train_idx.append(train if train_per_class is None else train[:train_per_class])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]
