"""Old home of backbone export and weight loading, kept so ``pathflow.train.export`` imports
keep working: the code lives in :mod:`pathflow.models.weights` (models sit below train,
extract and evaluate).

Example:
    >>> from pathflow.train.export import load_backbone
    >>> from pathflow.models.weights import load_backbone as same
    >>> load_backbone is same
    True
"""

from __future__ import annotations

from pathflow.models.weights import (
    ArchMismatchError,
    ExportsBackbone,
    clean_backbone_state,
    export_backbone,
    load_backbone,
    load_backbone_state,
    load_state_strict,
    weights_normalization,
)

__all__ = [
    "ArchMismatchError",
    "ExportsBackbone",
    "clean_backbone_state",
    "export_backbone",
    "load_backbone",
    "load_backbone_state",
    "load_state_strict",
    "weights_normalization",
]
