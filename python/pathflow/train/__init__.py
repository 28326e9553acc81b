"""Self-supervised training of pathology backbones (``pathflow train``).

Layout (lightly-style): ``backbones`` (any timm model, CLAM's truncated ResNet-50), ``heads``
(DINO head, SimCLR projector), ``losses`` (DINO, NT-Xent), ``methods`` (one file per method,
``create_method`` / ``list_methods``), ``schedules``, ``config`` (what the user wrote),
``plan`` (the run made of it: :class:`~pathflow.train.plan.RunPlan`), ``trainer`` (the loop),
``export`` (timm-compatible ``.safetensors``).

torch and timm are imported lazily: importing :mod:`pathflow.train` (or building the
``pathflow train`` argument parser) costs nothing until a name below is used.

Example:
    >>> from pathflow.train import list_methods
    >>> list_methods()  # doctest: +NORMALIZE_WHITESPACE
    ['barlowtwins', 'byol', 'clubyol', 'clusiam', 'dino', 'hipt4k', 'mocov2', 'mocov3',
     'sgcl', 'simclr', 'simsiam', 'swav']
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "pathflow.train.config",
    "RunPlan": "pathflow.train.plan",
    "create_backbone": "pathflow.train.backbones",
    "create_method": "pathflow.train.methods",
    "list_methods": "pathflow.train.methods",
    "SSLMethod": "pathflow.train.methods",
    "train": "pathflow.train.trainer",
    "TrainSummary": "pathflow.train.trainer",
    "export_backbone": "pathflow.train.export",
    "load_backbone_state": "pathflow.train.export",
    "load_backbone": "pathflow.train.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pathflow.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
