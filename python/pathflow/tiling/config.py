"""Configuration of ``pathflow tile``: a dataclass <- YAML file <- CLI flags.

Preset-dependent fields default to ``None`` and are filled by :meth:`TileConfig.resolve`
from the preset (``pathflow``, ``clam`` or ``tcga``). The resolved config is saved as
``config.yaml`` in the output folder.

Example:
    >>> from pathflow.tiling.config import TileConfig
    >>> cfg = TileConfig(inputs=["slides/"], out="out", preset="clam").resolve()
    >>> cfg.a_t, cfg.layout, cfg.mpp
    (100.0, 'clam', None)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError
from pathflow.grid import GridParams
from pathflow.tissue import PRESETS, TissueParams

#: Grid defaults per preset (tissue defaults live in ``pathflow.tissue.PRESETS``).
GRID_PRESETS: dict[str, dict[str, Any]] = {
    "pathflow": {"mpp": 0.5, "layout": "slide", "use_padding": False},
    "clam": {"mpp": None, "layout": "clam", "use_padding": True},
    "tcga": {"mpp": None, "layout": "clam", "use_padding": True},
}

_UNSET_BY_PRESET = ("seg_mpp", "a_t", "a_h", "area_unit", "mpp", "layout", "use_padding")


@dataclass
class TileConfig(YamlConfig):
    """Everything ``pathflow tile`` needs. Field names are the YAML keys (optionally under a
    ``tile:`` section, values converted to the field types); CLI flags are the same names with
    dashes (``a_t`` -> ``--a-t``)."""

    _section = "tile"

    inputs: list[str] = field(default_factory=list)
    out: str = "pathflow_out"
    sample: list[str] = field(default_factory=list)
    recursive: bool = False
    backend: str = "auto"
    slide_mpp: float | None = None  # only for slides whose file mpp is missing/implausible
    slide_mpp_csv: str | None = None
    force_slide_mpp: float | None = None  # every slide, whatever its file says
    preset: str = "pathflow"
    # tissue
    seg_level: int = -1
    seg_mpp: float | None = None
    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    otsu: bool = False
    a_t: float | None = None
    a_h: float | None = None
    max_holes: int = 8
    area_unit: str | None = None
    remove_ink: bool = False
    mask: str | None = None
    mask_mode: str = "intersect"  # intersect: --mask AND detected tissue; replace: --mask only
    # grid
    patch: int = 256
    mpp: float | None = None
    overlap: int = 0
    contour_fn: str = "four_pt"
    min_tissue: float | None = None
    layout: str | None = None
    use_padding: bool | None = None
    # shards
    shards: bool = False
    shard_prefix: str = "shard"
    shard_samples: int = 10_000
    shard_mb: float = 1024.0
    format: str = "jpg"
    quality: int = 90
    transcode: str = "auto"
    shuffle: bool = False
    seed: int = 0
    region: int | None = None
    region_patch: int = 256
    region_patches: bool = False
    shard_mpps: list[float] = field(default_factory=list)  # finest first; [] = one resolution
    # run
    overlay: bool = True
    thumbnail_size: int = 2048
    workers: int = 0
    threads: int = 0
    overwrite: bool = False
    # many jobs on one job folder (pathflow.jobs)
    part: str | None = None  # "I/N" or "auto" (job array index); None = the whole cohort
    executor: str = "local"  # local | dask
    scheduler: str | None = None  # dask scheduler address tcp://HOST:PORT
    scheduler_file: str | None = None  # dask scheduler file
    _explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    # ----------------------------------------------------------------------------------
    def resolve(self) -> TileConfig:
        """Fill preset-dependent fields that were not set explicitly; validate."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (expected {', '.join(PRESETS)})")
        out = dataclasses.replace(self)
        tissue = PRESETS[self.preset]
        grid = GRID_PRESETS[self.preset]
        for name in _UNSET_BY_PRESET:
            if name in self._explicit or getattr(self, name) is not None:
                continue
            if name in tissue:
                setattr(out, name, tissue[name])
            elif name in grid:
                setattr(out, name, grid[name])
        if out.shard_mpps:  # multi-magnification samples: the grid is laid at the finest
            first = float(out.shard_mpps[0])
            if "mpp" in self._explicit and out.mpp is not None and abs(out.mpp - first) > 1e-9:
                raise ConfigError(
                    f"--mpp {out.mpp:g} differs from the finest --shard-mpps {first:g} "
                    "(the grid is laid at the first shard mpp; drop --mpp)"
                )
            out.mpp = first
            if out.region is not None and len(out.shard_mpps) > 1:
                raise ConfigError("--shard-mpps cannot be combined with --region")
        if out.a_t is not None:
            out.a_t = float(out.a_t)
        if out.a_h is not None:
            out.a_h = float(out.a_h)
        try:
            out.tissue_params().validate()
            out.grid_params().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            out.shard_params().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if out.region is not None and out.region_patches and out.region % out.region_patch:
            raise ConfigError(
                f"--region {out.region} is not a multiple of --region-patch {out.region_patch}"
            )
        if out.executor not in ("local", "dask"):
            raise ConfigError(f"--executor must be local or dask, got {out.executor!r}")
        if out.part is not None and out.part.strip().lower() != "auto":
            from pathflow.jobs.partition import parse_part

            parse_part(out.part)
        if out.workers < 0 or out.threads < 0:
            raise ConfigError("workers and threads must be >= 0 (0 = automatic)")
        for flag, value in (("--slide-mpp", out.slide_mpp),
                            ("--force-slide-mpp", out.force_slide_mpp)):  # fmt: skip
            if value is not None and not 0.05 <= value <= 20:
                raise ConfigError(f"{flag} must be in 0.05..20 um/px, got {value}")
        if out.slide_mpp is not None and out.force_slide_mpp is not None:
            raise ConfigError(
                "--slide-mpp (fills in missing or implausible values) and --force-slide-mpp "
                "(replaces every slide's) exclude each other"
            )
        if out.mask_mode not in ("intersect", "replace"):
            raise ConfigError(f"--mask-mode must be intersect or replace, got {out.mask_mode!r}")
        return out

    def tissue_params(self) -> TissueParams:
        """The :class:`~pathflow.tissue.TissueParams` of this config."""
        p = PRESETS.get(self.preset, PRESETS["pathflow"])
        return TissueParams(
            preset=self.preset,
            seg_level=self.seg_level,
            seg_mpp=self.seg_mpp if "seg_mpp" in self._explicit or self.seg_mpp else p["seg_mpp"],
            sthresh=self.sthresh,
            mthresh=self.mthresh,
            close=self.close,
            otsu=self.otsu,
            a_t=self.a_t if self.a_t is not None else p["a_t"],
            a_h=self.a_h if self.a_h is not None else p["a_h"],
            max_holes=self.max_holes,
            area_unit=self.area_unit or p["area_unit"],
            remove_ink=self.remove_ink,
        )

    def grid_params(self) -> GridParams:
        """The :class:`~pathflow.grid.GridParams` of this config."""
        g = GRID_PRESETS.get(self.preset, GRID_PRESETS["pathflow"])
        return GridParams(
            patch=self.region or self.patch,
            mpp=self.mpp if (self.mpp is not None or "mpp" in self._explicit) else g["mpp"],
            overlap=self.overlap,
            contour_fn=self.contour_fn,
            min_tissue=self.min_tissue,
            layout=self.layout or g["layout"],
            use_padding=self.use_padding if self.use_padding is not None else g["use_padding"],
        )

    def shard_params(self) -> Any:
        """The :class:`~pathflow.tiling.shards.ShardParams` of this config."""
        from pathflow.tiling.shards import ShardParams

        return ShardParams(
            prefix=self.shard_prefix,
            max_samples=self.shard_samples,
            max_mb=self.shard_mb,
            format=self.format,
            quality=self.quality,
            transcode=self.transcode,
            shuffle=self.shuffle,
            seed=self.seed,
            sub_size=self.region_patch if (self.region and self.region_patches) else 0,
            backend=self.backend,
            threads=self.threads,
            mpps=[float(m) for m in self.shard_mpps],
        )

    # ----------------------------------------------------------------------------------
    def finish(self, explicit: set[str]) -> TileConfig:
        """After :meth:`build`: remember which fields were set, then :meth:`resolve`."""
        self._explicit = explicit
        return self.resolve()
