"""Seeded, stratified train/test splits of labelled samples: at random
(:func:`stratified_split`), or keeping each group, e.g. a slide's patches, on one side
(:func:`grouped_split`, scikit-learn's ``StratifiedGroupKFold``).

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


def grouped_split(
    labels: npt.ArrayLike, groups: npt.ArrayLike, test_fraction: float, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """Sorted (train, test) indices with every group (slide, patient) on one side only:
    scikit-learn's ``StratifiedGroupKFold`` with ``round(1 / test_fraction)`` folds (at most
    one per group), shuffled by ``seed``; the test side is the first fold whose train and
    test sides both hold every class. ``None`` when no fold does (a class whose samples
    all come from one group cannot be on both sides).

    Example:
        >>> y = np.array([0, 0, 1, 1] * 5)
        >>> g = np.repeat(np.arange(10), 2)  # 10 slides, 2 patches each
        >>> tr, te = grouped_split(y, g, 0.2, seed=0)
        >>> len(te), bool(set(g[tr]) & set(g[te]))
        (4, False)
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(labels, np.int64)
    g = np.asarray(groups)
    classes = np.unique(y)
    n_groups = len(np.unique(g))
    if n_groups < 2 or any(len(np.unique(g[y == c])) < 2 for c in classes):
        return None
    n_splits = min(max(2, round(1.0 / test_fraction)), n_groups)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only N members"
        warnings.simplefilter("ignore", UserWarning)
        for tr, te in folds.split(np.zeros((len(y), 1)), y, g):
            if len(np.unique(y[tr])) == len(classes) and len(np.unique(y[te])) == len(classes):
                return np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)
    return None
