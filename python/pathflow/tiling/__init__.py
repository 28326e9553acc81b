"""``pathflow tile``: slides -> tissue masks -> patch coordinates (and later, shards)."""

from pathflow.tiling.config import TileConfig
from pathflow.tiling.runner import TileReport, tile_slides

__all__ = ["TileConfig", "TileReport", "tile_slides"]
