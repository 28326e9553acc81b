"""Seeded, stratified train/test splits of labelled samples.

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.splits import stratified_split
    >>> tr, te = stratified_split(np.array([0] * 10 + [1] * 5), 0.2, seed=0)
    >>> len(tr), len(te), int((np.array([0] * 10 + [1] * 5)[te] == 1).sum())
    (12, 3, 1)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def stratified_split(
    labels: npt.ArrayLike, test_fraction: float, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sorted (train, test) indices; each class gives ``round(fraction * n_c)`` test samples,
    at least one when it has two or more, and always keeps one for training."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(seed)
    test: list[npt.NDArray[np.int64]] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n = idx.size
        n_test = min(max(round(test_fraction * n), 1 if n >= 2 else 0), n - 1)
        test.append(idx[:n_test])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(y.size, bool)
    mask[te] = False
    return np.flatnonzero(mask).astype(np.int64), te.astype(np.int64)
