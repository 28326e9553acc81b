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
    metadata (``key``, ``index``, ``slide``, ``x``, ``y``, ``label``). ``index`` is the batch's
    position in the epoch; ``skipped`` lists keys of corrupt samples replaced in this batch.
    With positive pairs, ``partner[i]`` is the encoded partner of sample ``i`` and view ``v``
    is cut from ``data`` (``sources[v] == 0``) or ``partner`` (1).
    """

    data: list[npt.NDArray[np.uint8]]
    params: list[ViewParams]
    meta: dict[str, Any]
    index: int
    epoch: int
    skipped: list[str] = field(default_factory=list)
    partner: list[npt.NDArray[np.uint8]] | None = None  # encoded partner images (pairs)
    sources: list[int] | None = None  # per view: 0 cut from data, 1 from partner
    no_partner: int = 0  # anchors paired with themselves (no neighbour / no other scale)

    def __len__(self) -> int:
        return len(self.data)


@dataclass
class Batch:
    """What the loader yields.

    Attributes:
        views: one tensor per view, ``[B, 3, S, S]`` (normalised float32/bfloat16, or uint8).
        meta: ``key`` and ``slide`` (lists of str), ``index`` (the global sample index in
            the :class:`~pathflow.data.ShardSet` order, the same on every rank, worker and
            epoch), ``x``, ``y``, ``label`` (int64 tensors; label -1 where the sample has
            none). With ``positives="neighbour"``/``"scale"`` also ``partner_index`` (int64:
            the partner's global index, the anchor's own where it has no partner), and for
            ``"scale"`` ``partner_mpp`` (float64, NaN where the sample has no other scale).
        index: position of this batch in the epoch on this rank.
        epoch: the epoch it belongs to.
        no_partner: anchors of this batch paired with themselves.
    """

    views: list[Any]
    meta: dict[str, Any]
    index: int
    epoch: int
    skipped: list[str] = field(default_factory=list)
    no_partner: int = 0

    def __len__(self) -> int:
        return int(self.views[0].shape[0]) if self.views else 0

    @classmethod
    def from_raw(cls, views: list[Any], raw: RawBatch) -> Batch:
        """The batch of ``views`` made from ``raw``: its position, epoch, skipped keys and
        unpaired count, and its metadata with the numeric fields as torch tensors."""
        return cls(
            views=views,
            meta=meta_to_torch(raw.meta),
            index=raw.index,
            epoch=raw.epoch,
            skipped=raw.skipped,
            no_partner=raw.no_partner,
        )


META_INT64 = ("index", "x", "y", "label", "partner_index")
META_FLOAT64 = ("partner_mpp",)


def meta_to_torch(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its numeric fields (:data:`META_INT64`, :data:`META_FLOAT64`) as torch
    tensors."""
    import torch

    out = dict(meta)
    for k in META_INT64:
        if k in meta:
            out[k] = torch.from_numpy(np.asarray(meta[k], dtype=np.int64))
    for k in META_FLOAT64:
        if k in meta:
            out[k] = torch.from_numpy(np.asarray(meta[k], dtype=np.float64))
    return out
