"""The loader's sample stream: which samples make each batch, read and screened, with their views'
random parameters drawn (:class:`~pathflow.data.batch.RawBatch`), before any pixel work.

:class:`BatchSource` is what a loader backend (:mod:`pathflow.data.backends`) consumes: one
epoch on one rank, picklable (DataLoader workers each read ``raw_batches(start + w, n)``).
Everything random is drawn from ``(seed, epoch, rank, batch)``, so every backend gets the same
batches whatever its number of workers, and a run resumes at any batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pathflow.choices import LOADER_OUTPUTS, POSITIVES
from pathflow.data.batch import RawBatch
from pathflow.data.shardset import ShardSet, epoch_order
from pathflow.data.views import (
    StainStats,
    ViewsSpec,
    pair_sources,
    sample_batch_params,
    sample_pair_params,
)

if TYPE_CHECKING:
    from pathflow.data.neighbours import NeighbourIndex

log = logging.getLogger("pathflow.data")

OUTPUTS = LOADER_OUTPUTS


@dataclass
class LoaderConfig:
    """Everything that defines the sample stream (saved with checkpoints and runs).

    ``shuffle_mode``: ``"permutation"`` (default: each rank reads its share of a seeded
    permutation of all samples, so every batch mixes all slides) or ``"buffer"`` (shards
    streamed through a shuffle buffer of ``shuffle_buffer`` samples; only for inputs that must
    be read sequentially: over shards holding one slide after another, larger than the buffer,
    a batch then comes from one or two slides). See :func:`~pathflow.data.epoch_order`.

    ``positives``: ``"augment"`` (views of the same patch), ``"neighbour"`` (a partner patch
    of the same slide within ``neighbour_radius`` grid steps, ``neighbour_metric``) or
    ``"scale"`` (the same spot at another magnification); see :func:`~pathflow.data.make_loader`.
    """

    batch_size: int = 64
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    shuffle_mode: str = "permutation"
    shuffle_buffer: int = 8192
    drop_last: bool = True
    output: str = "float"
    device: str = "cpu"
    backend: str = "torch"
    num_workers: int = 2
    positives: str = "augment"
    neighbour_radius: float = 2.0
    neighbour_metric: str = "chebyshev"


def draw_scales(
    shardset: ShardSet, indices: npt.NDArray[np.int64], seed: int, epoch: int
) -> tuple[list[str | None], npt.NDArray[np.float64]]:
    """For each sample, one of its other-magnification entries (``mpp1.jpg``...), uniform
    among those it has, drawn from ``hash_uniform(seed, epoch, index)``; None (and NaN mpp)
    where it has none."""
    from pathflow.data.neighbours import hash_uniform
    from pathflow.data.shardset import scale_mpp

    exts = shardset.scale_exts
    mask = shardset.scale_mask(indices)
    deg = mask.sum(axis=1)
    u = hash_uniform(seed, epoch, indices, salt=0x5CA1E)
    k = np.minimum(np.floor(u * deg).astype(np.int64), np.maximum(deg - 1, 0))
    col = np.argmax(np.cumsum(mask, axis=1) > k[:, None], axis=1)
    out: list[str | None] = [exts[c] if d > 0 else None for c, d in zip(col, deg, strict=True)]
    mpp = np.asarray([scale_mpp(e) if e else np.nan for e in out], dtype=np.float64)
    return out, mpp


def build_raw_batch(
    shardset: ShardSet,
    indices: npt.NDArray[np.int64],
    spec: ViewsSpec,
    *,
    seed: int,
    epoch: int,
    rank: int,
    index: int,
    stain_stats: StainStats | None,
    positives: str = "augment",
    neighbours: NeighbourIndex | None = None,
) -> RawBatch | None:
    """Read one batch, replace corrupt samples, and draw its view parameters.

    A corrupt image (bad header, truncated, not JPEG/PNG) or corrupt metadata (a ``.json``
    that is not JSON, lacks slide/x/y in pathflow's shards, or holds a non-integer position:
    :func:`~pathflow.data.shardset.parse_meta`) is logged, counted in ``skipped`` and
    replaced by the next valid sample of the same batch, so batch shapes never change and no
    sample reaches training with a made-up slide or position. Returns None only if no sample
    of the batch is valid.

    ``positives="neighbour"`` also reads, for every anchor, a partner drawn from its spatial
    neighbours (``neighbours.draw``), ``"scale"`` the anchor's entry at another magnification
    (:func:`draw_scales`); the views alternate between anchor and partner
    (:func:`~pathflow.data.views.pair_sources`). A corrupt partner is replaced by its anchor.
    """
    from pathflow import _core

    images, metas = shardset.read(indices)
    sizes, errors = _core.image_info(images)
    bad_meta = {i: str(m["error"]) for i, m in enumerate(metas) if m.get("error")}
    bad = [i for i, e in enumerate(errors) if e is not None or i in bad_meta]
    skipped: list[str] = []
    if bad:
        good = [i for i, e in enumerate(errors) if e is None and i not in bad_meta]
        for i in bad:
            if errors[i] is not None:
                log.warning("skipping corrupt image %s: %s", metas[i]["key"], errors[i])
            else:
                shard = shardset.shards[int(shardset.locate(indices[i : i + 1])[0][0])].path
                log.warning(
                    "skipping sample %s of %s: corrupt metadata: %s",
                    metas[i]["key"],
                    shard,
                    bad_meta[i],
                )
            skipped.append(str(metas[i]["key"]))
        if not good:
            return None
        for i in bad:
            j = next((g for g in good if g > i), good[0])
            images[i], metas[i] = images[j], metas[j]
            sizes[i] = sizes[j]
    rng = np.random.default_rng([seed, epoch, rank, index, 0xA06])
    meta: dict[str, Any] = {
        "key": [m["key"] for m in metas],
        "index": np.asarray([m["index"] for m in metas], dtype=np.int64),
        "slide": [m["slide"] for m in metas],
        "x": np.asarray([m["x"] for m in metas], dtype=np.int64),
        "y": np.asarray([m["y"] for m in metas], dtype=np.int64),
        "label": np.asarray([m["label"] for m in metas], dtype=np.int64),
    }
    data = [np.frombuffer(b, dtype=np.uint8) for b in images]
    if positives == "augment":
        params = sample_batch_params(spec, sizes[:, 0], sizes[:, 1], rng, stain_stats)
        return RawBatch(
            data=data, params=params, meta=meta, index=index, epoch=epoch, skipped=skipped
        )
    anchors = meta["index"]
    exts: list[str | None] | None = None
    if positives == "neighbour":
        if neighbours is None:
            raise ValueError("positives='neighbour' needs a NeighbourIndex")
        partners, alone = neighbours.draw(anchors, seed, epoch)
    elif positives == "scale":
        exts, mpp = draw_scales(shardset, anchors, seed, epoch)
        partners, alone = anchors.copy(), np.isnan(mpp)
        meta["partner_mpp"] = mpp
    else:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    pimages = shardset.read_images(partners, exts)
    psizes, perrors = _core.image_info(pimages)
    for i, e in enumerate(perrors):
        if e is None:
            continue
        name = shardset.key_of(int(partners[i])) + (f".{exts[i]}" if exts and exts[i] else "")
        log.warning("skipping corrupt partner image %s: %s", name, e)
        skipped.append(name)
        pimages[i], psizes[i] = images[i], sizes[i]
        partners[i], alone[i] = anchors[i], True
        if "partner_mpp" in meta:
            meta["partner_mpp"][i] = np.nan
    meta["partner_index"] = partners
    sources = pair_sources(spec)
    params = sample_pair_params(spec, (sizes, psizes), sources, rng, stain_stats)
    return RawBatch(
        data=data,
        params=params,
        meta=meta,
        index=index,
        epoch=epoch,
        skipped=skipped,
        partner=[np.frombuffer(b, dtype=np.uint8) for b in pimages],
        sources=sources,
        no_partner=int(alone.sum()),
    )


class Plan:
    """The batches of one epoch on one rank."""

    def __init__(self, shardset: ShardSet, cfg: LoaderConfig, epoch: int) -> None:
        self.order = epoch_order(
            shardset.counts,
            epoch=epoch,
            seed=cfg.seed,
            rank=cfg.rank,
            world=cfg.world_size,
            shuffle=cfg.shuffle,
            mode=cfg.shuffle_mode,
            buffer=cfg.shuffle_buffer,
            equal=cfg.drop_last,
        )
        bs = cfg.batch_size
        n = len(self.order)
        self.num_batches = n // bs if cfg.drop_last else math.ceil(n / bs)
        self.batch_size = bs

    def indices(self, b: int) -> npt.NDArray[np.int64]:
        return self.order[b * self.batch_size : (b + 1) * self.batch_size]


def num_batches(n_samples: int, cfg: LoaderConfig) -> int:
    if cfg.drop_last:
        return (n_samples // cfg.world_size) // cfg.batch_size
    per_rank = len(np.array_split(np.arange(n_samples), cfg.world_size)[cfg.rank])
    return math.ceil(per_rank / cfg.batch_size)


@dataclass
class BatchSource:
    """The raw batches of one epoch on one rank (what a loader backend iterates)."""

    shardset: ShardSet
    spec: ViewsSpec
    cfg: LoaderConfig
    epoch: int
    plan: Plan
    stain_stats: StainStats | None = None
    neighbours: NeighbourIndex | None = None

    @property
    def num_batches(self) -> int:
        return self.plan.num_batches

    def raw_batches(self, start: int, step: int = 1) -> Iterator[RawBatch]:
        """Batches ``start, start + step, ...`` of the epoch; a batch without a single valid
        image is logged and left out."""
        for b in range(start, self.plan.num_batches, step):
            raw = build_raw_batch(
                self.shardset,
                self.plan.indices(b),
                self.spec,
                seed=self.cfg.seed,
                epoch=self.epoch,
                rank=self.cfg.rank,
                index=b,
                stain_stats=self.stain_stats,
                positives=self.cfg.positives,
                neighbours=self.neighbours,
            )
            if raw is None:
                log.warning("batch %d of epoch %d has no valid image; skipped", b, self.epoch)
                continue
            yield raw
