"""``pathflow eval knn|linear|slide-knn``: DINO's weighted KNN and a linear probe on frozen
patch features; HIPT's slide-level KNN (:mod:`pathflow.evaluate.slide_knn`).

Example:
    >>> from pathflow.evaluate import EvalConfig, run_eval
    >>> cfg = EvalConfig.build({}, {"method": "knn", "train": "crc/train", "test": "crc/test",
    ...                            "arch": "vit_small_patch16_224"})  # doctest: +SKIP
    >>> print(run_eval(cfg).summary())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathflow.evaluate.config import EvalConfig
    from pathflow.evaluate.knn import KnnResult, knn_classify
    from pathflow.evaluate.linear import LinearProbe, LinearProbeConfig, train_linear_probe
    from pathflow.evaluate.metrics import ClassificationMetrics, classification_metrics
    from pathflow.evaluate.runner import EvalResult, run_eval

# Imported on first use, so that the CLI can build its parser without numpy or sklearn.
_LAZY = {
    "EvalConfig": "config",
    "KnnResult": "knn",
    "knn_classify": "knn",
    "LinearProbe": "linear",
    "LinearProbeConfig": "linear",
    "train_linear_probe": "linear",
    "ClassificationMetrics": "metrics",
    "classification_metrics": "metrics",
    "EvalResult": "runner",
    "run_eval": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pathflow.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pathflow.evaluate' has no attribute {name!r}")


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
