"""Batch containers shared by the loader and its backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.data.views import ViewParams


@dataclass
class RawBatch:
    """Encoded images of one batch plus everything needed to augment them.

    ``data[i]`` is the encoded JPEG/PNG of sample ``i`` as a uint8 array; ``params`` holds one
    :class:`ViewParams` per output view (sizes from the image headers); ``meta`` the per-sample
    metadata (``key``, ``slide``, ``x``, ``y``, ``label``). ``index`` is the batch's position in
    the epoch; ``skipped`` lists keys of corrupt samples replaced in this batch.
    """

    data: list[npt.NDArray[np.uint8]]
    params: list[ViewParams]
    meta: dict[str, Any]
    index: int
    epoch: int
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.data)


@dataclass
class Batch:
    """What the loader yields.

    Attributes:
        views: one tensor per view, ``[B, 3, S, S]`` (normalised float32/bfloat16, or uint8).
        meta: ``key`` and ``slide`` (lists of str), ``x``, ``y``, ``label`` (int64 tensors;
            label -1 where the sample has none).
        index: position of this batch in the epoch on this rank.
        epoch: the epoch it belongs to.
    """

    views: list[Any]
    meta: dict[str, Any]
    index: int
    epoch: int
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.views[0].shape[0]) if self.views else 0
