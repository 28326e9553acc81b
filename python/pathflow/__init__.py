"""pathflow: a fast data engine and self-supervised trainer for computational pathology.

Heavy submodules are imported lazily, so ``import pathflow`` and ``pathflow tile --help``
stay fast.

Example:
    >>> import pathflow
    >>> pathflow.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_slide": "pathflow.slide",
    "segment_tissue": "pathflow.tissue",
    "TissueParams": "pathflow.tissue",
    "patch_grid": "pathflow.grid",
    "GridParams": "pathflow.grid",
    "TileConfig": "pathflow.tiling.config",
    "tile_slides": "pathflow.tiling.runner",
    "sample_slide": "pathflow.data",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pathflow' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
