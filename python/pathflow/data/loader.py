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
- any other name registered with :func:`~pathflow.data.backends.register_loader_backend`
  (the protocol: :class:`~pathflow.data.backends.LoaderBackend`; the raw batches it gets:
  :class:`~pathflow.data.raw_batches.BatchSource`).

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
    >>> st["slides_per_batch_mean"], st["slides_per_batch_min"]  # one slide  # doctest: +SKIP
    (1.0, 1)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathflow.data.backends import (
    LoaderBackend,
    check_loader_backend,
    create_loader_backend,
    dali_available,
)
from pathflow.data.batch import Batch
from pathflow.data.neighbours import METRICS
from pathflow.data.position import EpochPosition
from pathflow.data.raw_batches import (
    OUTPUTS,
    POSITIVES,
    BatchSource,
    LoaderConfig,
    Plan,
    build_raw_batch,
    draw_scales,
    num_batches,
)
from pathflow.data.shardset import SHUFFLE_MODES, ShardSet
from pathflow.data.views import StainStats, ViewsSpec, create_views

if TYPE_CHECKING:
    from pathflow.data.neighbours import NeighbourIndex

__all__ = [
    "OUTPUTS",
    "POSITIVES",
    "Loader",
    "LoaderConfig",
    "Plan",
    "build_raw_batch",
    "dali_available",
    "draw_scales",
    "make_loader",
    "num_batches",
]

log = logging.getLogger("pathflow.data")


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        self._backend: LoaderBackend | None = None
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
        state["_backend"] = None  # a backend (a DALI pipeline) never travels to workers
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
    def source(self) -> BatchSource:
        """The raw batches of the current epoch on this rank (what the backend iterates)."""
        return BatchSource(
            self.shardset,
            self.spec,
            self.cfg,
            self.epoch,
            Plan(self.shardset, self.cfg, self.epoch),
            stain_stats=self.stain_stats,
            neighbours=self.neighbours,
        )

    @property
    def backend(self) -> LoaderBackend:
        """This loader's backend (``cfg.backend``), created on first use and kept."""
        if self._backend is None:
            self._backend = create_loader_backend(self.cfg.backend, self.cfg, self.spec)
        return self._backend

    def __iter__(self) -> Iterator[Batch]:
        source = self.source()
        if self._next >= source.num_batches:  # resumed from a state saved after the last batch
            self.epoch += 1
            self._next = 0
            source = self.source()
        for batch in self.backend.iterate(source, self._next):
            self._next = batch.index + 1
            self._count(batch)
            yield batch
        self.epoch += 1
        self._next = 0


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
        backend: ``"dali"``, ``"torch"``, ``"auto"`` (DALI on CUDA when installed, else
            torch: Rust decode + fused Rust augmentation kernel on the CPU), or another name
            from :func:`~pathflow.data.backends.list_loader_backends` (registered with
            :func:`~pathflow.data.backends.register_loader_backend`).
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
    check_loader_backend(backend)
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
