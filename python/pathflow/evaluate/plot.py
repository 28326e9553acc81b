"""2-D t-SNE map of an embedding coloured by label (scikit-learn + matplotlib, Agg canvas).

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.plot import tsne_plot
    >>> x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    >>> xy = tsne_plot(x, np.arange(60) % 3, ["a", "b", "c"], "/tmp/tsne.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.outputs import atomic_path


def tsne_embedding(
    features: npt.ArrayLike, seed: int = 0, perplexity: float = 30.0
) -> npt.NDArray[np.float32]:
    """t-SNE (PCA-initialised, seeded) of l2-normalised ``features`` to (N, 2)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the t-SNE plot needs scikit-learn: pip install 'pathflow[eval]'"
        ) from exc
    x = np.asarray(features, np.float32)
    n = x.shape[0]
    if n < 3:
        return np.zeros((n, 2), np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), np.float32)


def tsne_plot(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    class_names: Sequence[str],
    dest: str | os.PathLike[str],
    title: str = "",
    max_points: int = 5000,
    seed: int = 0,
) -> npt.NDArray[np.float32]:
    """Write a PNG scatter of the t-SNE map (at most ``max_points``, stratified sample) with
    one colour per class and a legend; return the (n, 2) coordinates plotted."""
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    if len(x) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, y = x[idx], y[idx]
    xy = tsne_embedding(x, seed=seed)
    _scatter(xy, y, list(class_names), dest, title or f"t-SNE of {len(x)} embeddings")
    return xy


def _scatter(
    xy: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    names: list[str],
    dest: str | os.PathLike[str],
    title: str,
) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap: Any = colormaps["tab10" if len(names) <= 10 else "tab20"]
    size = float(np.clip(3000.0 / max(len(xy), 1), 2.0, 30.0))
    for c, name in enumerate(names):
        sel = y == c
        if not sel.any():
            continue
        ax.scatter(
            xy[sel, 0], xy[sel, 1], s=size, color=cmap(c % cmap.N), label=f"{name} ({sel.sum()})",
            alpha=0.8, linewidths=0,
        )  # fmt: skip
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2,
              frameon=False)  # fmt: skip
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
