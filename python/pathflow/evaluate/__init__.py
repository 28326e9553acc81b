"""``pathflow eval knn|linear``: DINO's weighted KNN and a linear probe on frozen features.

Example:
    >>> from pathflow.evaluate import EvalConfig, run_eval
    >>> cfg = EvalConfig.build({}, {"method": "knn", "train": "crc/train", "test": "crc/test",
    ...                            "arch": "vit_small_patch16_224"})  # doctest: +SKIP
    >>> print(run_eval(cfg).summary())  # doctest: +SKIP
"""

from __future__ import annotations

from pathflow.evaluate.config import EvalConfig
from pathflow.evaluate.knn import KnnResult, knn_classify
from pathflow.evaluate.linear import LinearProbe, LinearProbeConfig, train_linear_probe
from pathflow.evaluate.metrics import ClassificationMetrics, classification_metrics
from pathflow.evaluate.runner import EvalResult, run_eval

__all__ = [
    "ClassificationMetrics",
    "EvalConfig",
    "EvalResult",
    "KnnResult",
    "LinearProbe",
    "LinearProbeConfig",
    "classification_metrics",
    "knn_classify",
    "run_eval",
    "train_linear_probe",
]
