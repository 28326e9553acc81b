"""What ``pathflow extract`` embeds, as plain data: encoded images (:class:`PatchRef`), the
groups written to one features file each (:class:`PatchGroup`, :class:`RegionGroup`), and
the error of an unusable input (:class:`SourceError`).

A leaf module: :mod:`pathflow.extract.sources` (shards, image folders) and
:mod:`pathflow.extract.slide_regions` (coordinate files + slides) both build these, and
``sources`` re-exports them (their old home).

Example:
    >>> import numpy as np
    >>> g = PatchGroup("s1", [PatchRef("a.jpg"), PatchRef("b.jpg")], np.zeros((2, 2), np.int64))
    >>> len(g), g.refs[0].size
    (2, -1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.exceptions import PathflowError

__all__ = ["PatchGroup", "PatchRef", "RegionGroup", "SourceError"]


class SourceError(PathflowError):
    """An input folder, shard or index cannot be used (the message names the file)."""


@dataclass(frozen=True)
class PatchRef:
    """Bytes of one encoded image: ``size`` bytes at ``offset`` of ``path`` (-1: whole file),
    or ``data`` already in memory (regions read from slides), or the ``error`` that kept it
    from being produced."""

    path: str
    offset: int = 0
    size: int = -1
    data: bytes | None = None
    error: str | None = None


@dataclass
class PatchGroup:
    """Patches written to one features file: refs, level-0 coords (N, 2), optional names."""

    name: str
    refs: list[PatchRef]
    coords: npt.NDArray[np.int64]
    names: list[str] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.refs)


@dataclass
class RegionGroup(PatchGroup):
    """The regions of one slide for region features: ``refs`` holds every region's
    ``grid x grid`` sub-patches (region after region, each in row-major order), ``coords``
    the level-0 top-left corner of each region (one row per region)."""

    grid: int = 0

    @property
    def num_regions(self) -> int:
        return len(self.coords)
