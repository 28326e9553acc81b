"""Weighted k-nearest-neighbour classifier on frozen features, exactly as DINO's
``eval_knn.py``: l2-normalised features, cosine similarity, the ``k`` most similar training
samples vote for their class with weight ``exp(similarity / T)``; the prediction is the class
with the largest summed vote (defaults ``k=20``, ``T=0.07``).

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.knn import knn_classify
    >>> train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    >>> res = knn_classify(train, np.array([0, 0, 1, 1]), np.array([[1, 0.2]], np.float32),
    ...                    n_classes=2, k=3, temperature=0.5)
    >>> int(res.predictions[0]), round(float(res.scores[0, 0]), 3)
    (0, 0.887)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass
class KnnResult:
    """Summed class votes (N, C), votes normalised to sum 1 (``scores``), predictions (N,)."""

    votes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    predictions: npt.NDArray[np.int64]


def knn_classify(
    train_features: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_features: npt.ArrayLike,
    n_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
    device: Any = None,
) -> KnnResult:
    """DINO's weighted KNN vote for every test sample (see the module docstring).

    ``k`` is clipped to the number of training samples; ``chunk`` bounds memory (test rows
    per similarity block); ``device`` is a torch device (default CPU).
    """
    import torch

    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, T={temperature}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    train = torch.as_tensor(np.asarray(train_features, np.float32), device=dev)
    test = torch.as_tensor(np.asarray(test_features, np.float32), device=dev)
    labels = torch.as_tensor(np.asarray(train_labels, np.int64), device=dev)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D: {train.shape} vs {test.shape}")
    if labels.shape != (train.shape[0],):
        raise ValueError(f"{labels.shape[0]} train labels for {train.shape[0]} train features")
    if train.shape[0] == 0:
        raise ValueError("no training samples")
    train = torch.nn.functional.normalize(train, dim=1, p=2)
    test = torch.nn.functional.normalize(test, dim=1, p=2)
    k = min(k, train.shape[0])
    train_t = train.t().contiguous()
    votes = torch.zeros(test.shape[0], n_classes, dtype=torch.float32, device=dev)
    with torch.inference_mode():
        for start in range(0, test.shape[0], chunk):
            block = test[start : start + chunk]
            similarity = block @ train_t
            distances, indices = similarity.topk(k, dim=1, largest=True, sorted=True)
            neighbours = labels[indices]  # (b, k)
            weights = (distances / temperature).exp()
            one_hot = torch.zeros(block.shape[0], k, n_classes, device=dev)
            one_hot.scatter_(2, neighbours.unsqueeze(2), 1.0)
            votes[start : start + chunk] = (one_hot * weights.unsqueeze(2)).sum(1)
    v = votes.cpu().numpy()
    total = v.sum(1, keepdims=True)
    scores = np.divide(v, total, out=np.zeros_like(v), where=total > 0)
    return KnnResult(votes=v, scores=scores, predictions=v.argmax(1).astype(np.int64))
