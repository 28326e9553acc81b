"""``pathflow tile``: slides -> tissue masks -> patch coordinates (and later, shards)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathflow.tiling.config import TileConfig
    from pathflow.tiling.runner import TileReport, tile_slides

# Imported on first use, so that the CLI can build its parser without numpy.
_LAZY = {"TileConfig": "config", "TileReport": "runner", "tile_slides": "runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pathflow.tiling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pathflow.tiling' has no attribute {name!r}")


__all__ = ["TileConfig", "TileReport", "tile_slides"]
