"""Models: backbone creation and weight loading/export, below ``train``, ``extract`` and
``evaluate`` (which import from here, never the reverse).

* :mod:`pathflow.models.backbones`: ``create_backbone`` (any timm name, CLAM's
  ``resnet50_trunc``, pathflow's own models), ``check_backbone``.
* :mod:`pathflow.models.weights`: timm-compatible ``.safetensors`` export, and strict loading of
  our checkpoints and exports, DINO/HIPT training checkpoints and plain state dicts.
* :mod:`pathflow.models.registry`: pathflow's own models (timm covers the rest), behind a
  timm-style registry; ``vit4k_xs`` is HIPT's ViT-4K over grids of ViT-256 features
  (:mod:`pathflow.models.vit4k`).
* :mod:`pathflow.models.hipt`: the 256 -> 4096 hierarchy (ViT-256 patch features of a
  region's grid, ViT-4K region descriptors) and loading HIPT's published checkpoints.
* :mod:`pathflow.models.pos_embed`: DINO's position-embedding resize, used by every timm
  ViT that pathflow builds.

Example:
    >>> from pathflow.models import create_model, list_models
    >>> list_models()
    ['vit4k_xs']
    >>> create_model("vit4k_xs").num_features
    192
"""

from __future__ import annotations

import importlib
from typing import Any

from pathflow.models.pos_embed import interpolate_pos_encoding, use_dino_pos_embed
from pathflow.models.registry import create_model, list_models
from pathflow.models.vit4k import ViT4K, vit4k_xs

#: Names imported on first use (timm, safetensors), so ``import pathflow.models`` stays light.
_LAZY = {
    "create_backbone": "pathflow.models.backbones",
    "check_backbone": "pathflow.models.backbones",
    "export_backbone": "pathflow.models.weights",
    "load_backbone": "pathflow.models.weights",
    "load_backbone_state": "pathflow.models.weights",
    "ArchMismatchError": "pathflow.models.weights",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pathflow.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ViT4K",
    "create_model",
    "interpolate_pos_encoding",
    "list_models",
    "use_dino_pos_embed",
    "vit4k_xs",
    *sorted(_LAZY),
]
