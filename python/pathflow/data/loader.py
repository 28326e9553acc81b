"""``make_loader``: SSL views over WebDataset shards, with a DALI or a torch backend.

Both backends share everything but the pixel work: the shard index and epoch order
(:mod:`shardset`), corrupt-sample screening (Rust header check), and every random parameter
(:mod:`views`, drawn per batch from ``(seed, epoch, rank, batch)``). So they produce the same
crops, flips and colour changes for the same seed, a run resumes at any batch, and the batch
sequence does not depend on the number of workers.

- ``backend="dali"``: NVIDIA DALI decodes (nvJPEG on the GPU, libjpeg-turbo on the CPU) and
  augments on the same device; outputs are handed to torch on that device.
- ``backend="torch"``: Rust decodes, crops and resizes in DataLoader workers; the float stages
  run in one fused Rust kernel per view in the workers on CPU (``_core.augment_views``), or
  in torch on the GPU in the main process when ``device="cuda"`` (:mod:`augment_torch`).

Order: by default each rank reads its share of a seeded global permutation of all samples
(``shuffle_mode="permutation"``), so batches mix all slides even when the shards hold the
slides one after another; ``shuffle_mode="buffer"`` streams shards through a shuffle buffer
instead. ``loader.stats`` counts samples, batches, skipped images and the distinct slides per
batch (``slides_per_batch_mean``, ``slides_per_batch_min``).

Positive pairs (``positives=``): ``"neighbour"`` pairs each sample with a patch of the same
slide within a radius (:class:`~pathflow.data.neighbours.NeighbourIndex`), ``"scale"`` with
the same spot at another magnification; the views alternate between the two images, and the
partner is drawn from ``(seed, epoch, sample index)``, so order, splits and resume are as
above. ``batch.meta["index"]`` is every sample's global index in the ShardSet order.

Example:
    >>> from pathflow.data import make_loader
    >>> loader = make_loader("out/shards", views="simclr", batch_size=32)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     v1, v2 = batch.views          # [32, 3, 224, 224] float32, normalised
    ...     slides = batch.meta["slide"]
    >>> st = loader.stats  # doctest: +SKIP
    >>> st["slides_per_batch_mean"], st["slides_per_batch_min"]  # doctest: +SKIP
    (11.8, 7)
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pathflow.data.batch import Batch, RawBatch, meta_to_torch
from pathflow.data.neighbours import METRICS
from pathflow.data.position import EpochPosition
from pathflow.data.shardset import SHUFFLE_MODES, ShardSet, epoch_order
from pathflow.data.views import (
    StainStats,
    ViewsSpec,
    create_views,
    pair_sources,
    sample_batch_params,
    sample_pair_params,
)

if TYPE_CHECKING:
    from pathflow.data.neighbours import NeighbourIndex

log = logging.getLogger("pathflow.data")

OUTPUTS = ("float", "bfloat16", "uint8")
POSITIVES = ("augment", "neighbour", "scale")


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
    ``"scale"`` (the same spot at another magnification); see :func:`make_loader`.
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


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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


def _check_order(shardset: ShardSet, cfg: LoaderConfig) -> None:
    """Validate the shuffle mode and warn when a buffer over unshuffled shards is too small."""
    if cfg.shuffle_mode not in SHUFFLE_MODES:
        raise ValueError(f"shuffle_mode must be one of {SHUFFLE_MODES}, got {cfg.shuffle_mode!r}")
    if not cfg.shuffle or cfg.shuffle_mode != "buffer" or shardset.shuffled is not False:
        return
    largest = int(shardset.counts.max())
    if largest > cfg.shuffle_buffer:
        log.warning(
            "shuffle_mode='buffer' over shards written one slide after another (shards.json "
            "'shuffled': false) with shards of up to %d samples and a buffer of %d: batches "
            "will come from few slides; use shuffle_mode='permutation' (the default) or tile "
            "with --shuffle",
            largest,
            cfg.shuffle_buffer,
        )


class Loader(EpochPosition):
    """Iterable over :class:`~pathflow.data.batch.Batch` es; see :func:`make_loader`.

    ``stats`` (cumulative over the batches yielded, kept across :meth:`load_state_dict`):
    ``samples``, ``batches``, ``skipped`` (corrupt images or metadata replaced), ``no_partner``
    (with positive pairs: anchors paired with themselves, having no neighbour within the
    radius or no other magnification), and ``slides_per_batch_mean`` /
    ``slides_per_batch_min``, the mean and minimum number of distinct ``meta["slide"]``
    values per batch (0 before the first batch).
    """

    def __init__(
        self,
        shardset: ShardSet,
        spec: ViewsSpec,
        cfg: LoaderConfig,
        stain_stats: StainStats | None = None,
    ) -> None:
        _check_order(shardset, cfg)
        self.shardset = shardset
        self.spec = spec
        self.cfg = cfg
        self.stain_stats = stain_stats
        self._init_position()
        self.stats["no_partner"] = 0
        self._dali: Any = None
        self.neighbours: NeighbourIndex | None = None
        if cfg.positives == "neighbour":
            from pathflow.data.neighbours import NeighbourIndex

            self.neighbours = NeighbourIndex.from_shards(
                shardset, radius=cfg.neighbour_radius, metric=cfg.neighbour_metric
            )

    def __len__(self) -> int:
        return num_batches(len(self.shardset), self.cfg)

    def order_mode(self) -> str:
        return self.cfg.shuffle_mode if self.cfg.shuffle else "none"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dali"] = None  # a DALI pipeline never travels to DataLoader workers
        return state

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Loader({len(self.shardset)} samples, {len(self)} batches of {c.batch_size}, "
            f"views={self.spec.name} x{self.spec.num_views}, positives={c.positives}, "
            f"backend={c.backend}, "
            f"device={c.device}, shuffle_mode={c.shuffle_mode}, rank {c.rank}/{c.world_size})"
        )

    # ------------------------------------------------------------------ state
    def _positives(self) -> dict[str, Any]:
        c = self.cfg
        out: dict[str, Any] = {"positives": c.positives}
        if c.positives == "neighbour":
            out.update(neighbour_radius=c.neighbour_radius, neighbour_metric=c.neighbour_metric)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._positives()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in self._positives().items():
            old = state.get(k, "augment" if k == "positives" else None)
            if old != v:
                raise ValueError(f"cannot resume loader: {k} was {old}, now {v}")
        super().load_state_dict(state)

    def _count(self, batch: Batch) -> None:
        super()._count(batch)
        self.stats["no_partner"] = int(self.stats.get("no_partner", 0)) + batch.no_partner

    # -------------------------------------------------------------- iteration
    def _raw_batches(self, plan: Plan, start: int, step: int = 1) -> Iterator[RawBatch]:
        for b in range(start, plan.num_batches, step):
            raw = build_raw_batch(
                self.shardset,
                plan.indices(b),
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

    def __iter__(self) -> Iterator[Batch]:
        plan = Plan(self.shardset, self.cfg, self.epoch)
        if self._next >= plan.num_batches:  # resumed from a state saved after the last batch
            self.epoch += 1
            self._next = 0
            plan = Plan(self.shardset, self.cfg, self.epoch)
        start = self._next
        it = (
            self._iter_dali(plan, start)
            if self.cfg.backend == "dali"
            else self._iter_torch(plan, start)
        )
        for batch in it:
            self._next = batch.index + 1
            self._count(batch)
            yield batch
        self.epoch += 1
        self._next = 0

    def _iter_torch(self, plan: Plan, start: int) -> Iterator[Batch]:
        import torch

        from pathflow.data.torch_backend import ViewsDataset, finish_on_device

        on_gpu = self.cfg.device.startswith("cuda")
        ds = ViewsDataset(self, plan, start, augment=not on_gpu)
        workers = self.cfg.num_workers
        if workers > 0:
            dl = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=workers,
                pin_memory=on_gpu,
                worker_init_fn=_worker_init,
                prefetch_factor=2,
                multiprocessing_context=_worker_context(),
            )
            source: Any = dl
        else:
            source = ds
        for item in source:
            if on_gpu:
                item = finish_on_device(item, self.spec, self.cfg.output, self.cfg.device)
            yield item

    def _iter_dali(self, plan: Plan, start: int) -> Iterator[Batch]:
        import torch

        if self._dali is None:
            from pathflow.data.dali_backend import DaliViews

            dev = "gpu" if self.cfg.device.startswith("cuda") else "cpu"
            device_id = None
            if dev == "gpu":
                device_id = torch.device(self.cfg.device).index
                if device_id is None:
                    device_id = torch.cuda.current_device()
            self._dali = DaliViews(
                self.spec,
                batch_size=self.cfg.batch_size,
                device=dev,
                output=self.cfg.output,
                num_threads=max(1, self.cfg.num_workers),
                device_id=device_id,
                sources=None if self.cfg.positives == "augment" else pair_sources(self.spec),
            )
        for views, raw in self._dali.iterate(self._raw_batches(plan, start)):
            yield Batch(
                views=views,
                meta=meta_to_torch(raw.meta),
                index=raw.index,
                epoch=raw.epoch,
                skipped=raw.skipped,
                no_partner=raw.no_partner,
            )


def _worker_context() -> str | None:
    """``fork`` (fast) unless a DALI pipeline ran in this process: DALI's threads and CUDA
    state do not survive a fork (workers can crash), so then a fresh forkserver is used."""
    if os.name != "posix":
        return None
    return "forkserver" if "pathflow.data.dali_backend" in sys.modules else "fork"


def _worker_init(_: int) -> None:
    import signal

    import torch

    from pathflow import _core

    torch.set_num_threads(1)
    _core.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the main process checkpoints and stops the
    # workers itself, a worker that died of it would end the run with a traceback instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    shards: str | Path | Sequence[str | Path] | ShardSet,
    views: str | ViewsSpec = "dino",
    batch_size: int = 64,
    *,
    device: str = "auto",
    backend: str = "auto",
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int | None = None,
    output: str = "float",
    drop_last: bool = True,
    shuffle: bool = True,
    shuffle_mode: str = "permutation",
    shuffle_buffer: int = 8192,
    stain_stats: StainStats | dict[str, Any] | None = None,
    positives: str = "augment",
    neighbour_radius: float = 2.0,
    neighbour_metric: str = "chebyshev",
) -> Loader:
    """A loader of SSL views over WebDataset shards.

    Args:
        shards: a shard directory (``shards.json`` from ``pathflow tile --shards``, or any
            directory of WebDataset ``.tar``), a ``.tar``, or a list of tars.
        views: a preset from :func:`pathflow.data.list_views` or a :class:`ViewsSpec`.
        batch_size: samples per batch and rank.
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"``, or ``"auto"`` (CUDA when available).
        backend: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI on CUDA when installed, else
            torch: Rust decode + fused Rust augmentation kernel on the CPU).
        seed: seeds the epoch order and every augmentation.
        rank, world_size: DDP split (default: from ``torch.distributed`` or RANK/WORLD_SIZE).
        num_workers: DataLoader workers (torch backend) or DALI threads (default: CPU count).
        output: ``"float"`` (normalised float32), ``"bfloat16"`` or ``"uint8"`` (0..255).
        drop_last: equal batch counts on every rank and no partial batches; with False every
            sample is visited exactly once per epoch.
        shuffle: False reads the shards in order (each rank a contiguous part).
        shuffle_mode: ``"permutation"`` (default): each rank reads its share of a seeded
            permutation of all samples, so every batch mixes all slides whatever the shard
            layout. ``"buffer"``: shards in seeded order through a shuffle buffer of
            ``shuffle_buffer`` samples, for inputs that must be streamed; over shards that
            hold one slide after another (``ShardSet.shuffled`` False) and are larger than
            the buffer, batches come from one or two slides (a warning says so).
        shuffle_buffer: buffer size of ``shuffle_mode="buffer"``.
        stain_stats: RandStainNA statistics; fitted on the shards when a view needs them.
        positives: what the views of a sample are cut from. ``"augment"`` (default): all from
            the sample. ``"neighbour"``: the views alternate between the sample (anchor) and
            a partner drawn uniformly from the patches of the same slide within
            ``neighbour_radius`` grid steps (:class:`~pathflow.data.NeighbourIndex`; the
            anchor itself where it has none, counted in ``stats["no_partner"]``).
            ``"scale"``: the partner is the same spot at another magnification (entries
            ``mpp<v>.jpg`` of ``pathflow tile --shards --shard-mpps 0.5,1,2``), uniform among
            the sample's other scales; the anchor is its main (finest) image. Two-view
            methods get (anchor, partner); DINO's globals are (anchor, partner), its locals
            alternate (:func:`~pathflow.data.views.pair_sources`). The partner is drawn from
            ``(seed, epoch, sample index)``: the same on any rank, worker count or resume.
        neighbour_radius: in grid steps (neighbours have ``0 < distance <= radius``; 2 is
            the 5 x 5 block without its centre, SGCL's ``0 < d < 3``).
        neighbour_metric: ``"chebyshev"`` (default) or ``"euclidean"``.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_mode not in SHUFFLE_MODES:
        raise ValueError(f"shuffle_mode must be one of {SHUFFLE_MODES}, got {shuffle_mode!r}")
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    if neighbour_metric not in METRICS:
        raise ValueError(f"neighbour_metric must be one of {METRICS}, got {neighbour_metric!r}")
    if not neighbour_radius > 0:
        raise ValueError(f"neighbour_radius must be > 0 grid steps, got {neighbour_radius}")
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    spec = create_views(views)
    if positives != "augment" and spec.num_views < 2:
        raise ValueError(
            f"positives={positives!r} needs views with at least two views "
            f"({spec.name} has {spec.num_views})"
        )
    if positives == "scale" and not ss.scale_exts:
        raise ValueError(
            f"{shards if not isinstance(shards, ShardSet) else ss.shards[0].path.parent}: "
            "positives='scale' "
            "needs multi-magnification samples (mpp<v>.jpg entries of pathflow tile --shards "
            "--shard-mpps 0.5,1,2); these shards have one resolution"
        )
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    if backend == "auto":
        # DALI wins on the GPU; on the CPU the Rust kernels of the torch backend are faster
        # (benches/test_bench_loader.py).
        backend = "dali" if device.startswith("cuda") and dali_available() else "torch"
    if backend not in ("dali", "torch"):
        raise ValueError(f"backend must be 'dali', 'torch' or 'auto', got {backend!r}")
    if backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install 'pathflow[gpu]'")
    r, w = _dist_rank_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if isinstance(stain_stats, dict):
        stain_stats = StainStats.from_dict(stain_stats)
    if spec.needs_stain_stats and stain_stats is None:
        from pathflow.data.stain import fit_stain_stats

        stain_stats = fit_stain_stats(ss, seed=seed)
        log.info("fitted RandStainNA statistics on %s: %s", "the shards", stain_stats.to_dict())
    cfg = LoaderConfig(
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        shuffle_mode=shuffle_mode,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
        output=output,
        device=device,
        backend=backend,
        num_workers=num_workers,
        positives=positives,
        neighbour_radius=float(neighbour_radius),
        neighbour_metric=neighbour_metric,
    )
    loader = Loader(ss, spec, cfg, stain_stats)
    if len(loader) == 0:
        raise ValueError(
            f"{len(ss)} samples give no batch of {batch_size} on each of {world_size} rank(s); "
            "use a smaller batch_size or drop_last=False"
        )
    return loader
