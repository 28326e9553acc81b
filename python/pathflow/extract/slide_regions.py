"""Patches and regions straight from coordinate files + slides, for ``pathflow extract``
without shards (the CLAM / TRIDENT way).

Inputs: the output folder of ``pathflow tile`` (its ``coords/<slide>.h5``), a folder of such
files, or CLAM's ``patches/*.h5`` (``coords`` [M, 2] level-0 top-left corners; attrs
``patch_level``, ``patch_size``). The slide of each file is ``--slides DIR`` + the file's stem
(any slide extension), else the ``slide_path`` attribute pathflow writes. Each patch (or
region) is read at ``patch_level`` (``patch_size`` pixels there), resampled to the output size
(``target_patch_size`` when pathflow tiled at a target mpp, else ``patch_size``), for regions
cut into the grid of ``--region-patch`` sub-patches, and encoded by the same Rust code as
``pathflow tile --shards`` (tiled JPEG TIFF/SVS levels read by the Rust tile reader, native
tiles passed through where the grid lines up with them, other slides read by the slide
readers in a thread pool), so the features equal those of the same patches extracted from
shards.

Reading runs in a background thread a few chunks ahead of the model; nothing is held beyond
that.

Example:
    >>> from pathflow.extract.slide_regions import coords_groups
    >>> groups = coords_groups("tile_out")  # doctest: +SKIP
    >>> groups[0].name, len(groups[0]), groups[0].coords.shape  # doctest: +SKIP
    ('cmu_small_region', 43, (43, 2))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.exceptions import ConfigError
from pathflow.extract.types import PatchGroup, PatchRef, RegionGroup, SourceError

#: Slide file extensions looked up in ``--slides``.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".qptiff", ".jpg", ".jpeg", ".png")  # fmt: skip


@dataclass(frozen=True)
class SlideReadSpec:
    """How to produce one slide's patches (``region_patch`` 0) or regions cut into
    ``region_patch`` px sub-patches: read ``read_size`` px at ``read_level``, resample to
    ``region_size`` px, encode as ``format`` (``pathflow tile --shards``' encoder)."""

    slide: str
    read_level: int
    read_size: int
    region_size: int
    region_patch: int = 0
    quality: int = 90
    backend: str = "auto"
    format: str = "jpg"
    transcode: str = "auto"
    threads: int = 2


#: The former name (regions only).
RegionReadSpec = SlideReadSpec


class MissingSlideRefs:
    """The refs of a coordinate file whose slide cannot be found: every ref carries the
    one-line error, so that slide fails alone (its manifest row names the problem) and the
    other slides of the run are extracted."""

    def __init__(self, source: Path, error: str, count: int) -> None:
        self.ref = PatchRef(path=str(source), error=error)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[PatchRef]:
        for _ in range(self.count):
            yield self.ref


class SlidePatchRefs:
    """The refs of one slide's patches (or regions' sub-patches), produced lazily:
    iterating reads and encodes them in a background thread (``chunk`` coordinates at a time,
    ``ahead`` chunks ahead) and yields one ref per patch (a region's ``grid x grid`` refs in
    row-major order). A patch or region that cannot be read yields refs carrying the error
    (the embedder reports it)."""

    def __init__(
        self,
        spec: SlideReadSpec,
        coords: npt.NDArray[np.int64],
        chunk: int | None = None,
        ahead: int = 2,
    ) -> None:
        self.spec = spec
        self.coords = coords
        self.grid = spec.region_size // spec.region_patch if spec.region_patch else 1
        self.chunk = max(1, chunk or (4 if spec.region_patch else 128))
        self.ahead = max(1, ahead)

    def __len__(self) -> int:
        return len(self.coords) * self.grid * self.grid

    def __iter__(self) -> Iterator[PatchRef]:
        from pathflow.threads import background

        s = self.spec
        n = self.grid * self.grid
        try:
            for chunk in background(self._chunks(), self.ahead, "pathflow-slide-read"):
                for item in chunk:
                    if isinstance(item, str):
                        yield from [PatchRef(s.slide, error=item)] * n
                        continue
                    if not s.region_patch:
                        yield PatchRef(s.slide, data=item[0])
                        continue
                    subs = item[1:]  # the whole region's encoding comes first
                    if len(subs) != n:
                        raise SourceError(f"{s.slide}: region cut into {len(subs)}, not {n}")
                    yield from (PatchRef(s.slide, data=b) for b in subs)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{s.slide}: {exc}") from exc

    def _chunks(self) -> Iterator[list[list[bytes] | str]]:
        """Encoded patches/regions, ``chunk`` at a time (an error string for one that failed;
        every one fails when the slide cannot be opened)."""
        from pathflow.tiling.sources import PatchSpec, open_source

        s = self.spec
        try:
            source = open_source(
                Path(s.slide),
                s.backend,
                PatchSpec(
                    s.read_level, s.read_size, s.region_size, s.format, s.quality, s.region_patch
                ),
                s.transcode,
                s.threads,
            )
        except Exception as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            yield [why] * len(self.coords)
            return
        try:
            for start in range(0, len(self.coords), self.chunk):
                yield source.produce(self.coords[start : start + self.chunk])
        finally:
            source.close()


#: The former name (regions only).
SlideRegionRefs = SlidePatchRefs


def _coord_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".h5":
        return [path]
    for d in (path / "coords", path / "patches", path):
        files = sorted(d.glob("*.h5")) if d.is_dir() else []
        if files:
            return files
    return []


def is_coords_folder(path: str | os.PathLike[str]) -> bool:
    """True for a coordinate file, a folder of them or a tile output folder with ``coords/``."""
    import h5py

    files = _coord_files(Path(path))
    if not files:
        return False
    try:
        with h5py.File(files[0], "r", locking=False) as f:
            return "coords" in f and "region_features" not in f and "features" not in f
    except OSError:
        return False


def _find_slide(stem: str, slides: Path | None, attrs: dict[str, Any], source: Path) -> str:
    if slides is not None:
        for suffix in SLIDE_SUFFIXES:
            for cand in (slides / f"{stem}{suffix}", slides / f"{stem}{suffix.upper()}"):
                if cand.is_file():
                    return str(cand)
        raise ConfigError(f"{source}: no slide named {stem}.* in {slides}")
    sp = attrs.get("slide_path")
    if isinstance(sp, bytes):
        sp = sp.decode()
    if not sp:
        raise ConfigError(f"{source}: no slide_path attribute; pass --slides DIR")
    if not Path(str(sp)).is_file():
        raise ConfigError(f"{source}: slide {sp} not found; pass --slides DIR")
    return str(sp)


@dataclass(frozen=True)
class SlideReadOptions:
    """How coordinate inputs are read and encoded: as ``pathflow tile --shards`` does by
    default (JPEG quality 90, native JPEG tiles passed through where the grid lines up), so
    the features equal those of the shards."""

    slides: str | None = None
    format: str = "jpg"
    quality: int = 90
    transcode: str = "auto"
    backend: str = "auto"
    threads: int = 2


def _read_coords(f: Path) -> tuple[npt.NDArray[np.int64], dict[str, Any]]:
    import h5py

    try:
        with h5py.File(f, "r", locking=False) as h:
            if "coords" not in h:
                raise ConfigError(f"{f}: no coords dataset")
            coords = np.asarray(h["coords"][()], np.int64).reshape(-1, 2)
            attrs = {**dict(h.attrs), **dict(h["coords"].attrs)}
    except OSError as exc:
        raise ConfigError(f"{f}: unreadable coordinate file ({exc})") from exc
    if "patch_level" not in attrs or "patch_size" not in attrs:
        raise ConfigError(f"{f}: coords need the patch_level and patch_size attributes")
    return coords, attrs


def _name(attrs: dict[str, Any], f: Path) -> str:
    name = attrs.get("name", f.stem)
    return name.decode() if isinstance(name, bytes) else str(name)


def coords_groups(
    path: str | os.PathLike[str],
    options: SlideReadOptions | None = None,
    region_patch: int = 0,
    keep: Callable[[str], bool] | None = None,
) -> list[PatchGroup]:
    """One group per coordinate file, its refs produced from the slide: a
    :class:`~pathflow.extract.types.PatchGroup` of patches (``region_patch`` 0, the features
    of ``pathflow extract`` on patch shards), else a
    :class:`~pathflow.extract.types.RegionGroup` of regions cut into ``region_patch`` px
    sub-patches. ``keep(stem)`` selects files by stem (the slide id, ``--part``) before they
    are opened."""
    opts = options or SlideReadOptions()
    files = _coord_files(Path(path))
    if not files:
        raise ConfigError(f"{path}: no coordinate files (*.h5 with coords, or coords/*.h5)")
    sdir = Path(opts.slides) if opts.slides else None
    groups: list[PatchGroup] = []
    for f in files:
        if keep is not None and not keep(f.stem):
            continue
        coords, attrs = _read_coords(f)
        read_size = int(attrs["patch_size"])
        out_size = int(attrs.get("target_patch_size", read_size))
        if region_patch and out_size % region_patch:
            raise ConfigError(
                f"{f}: regions of {out_size} px are not a multiple of --region-patch {region_patch}"
            )
        try:
            slide = _find_slide(f.stem, sdir, attrs, f)
        except ConfigError as exc:  # this slide fails alone, the others go on
            slide, missing = "", str(exc)
        else:
            missing = ""
        spec = SlideReadSpec(
            slide=slide,
            read_level=int(attrs["patch_level"]),
            read_size=read_size,
            region_size=out_size,
            region_patch=region_patch,
            quality=opts.quality,
            backend=opts.backend,
            format=opts.format,
            transcode=opts.transcode,
            threads=opts.threads,
        )
        refs: SlidePatchRefs | MissingSlideRefs = SlidePatchRefs(spec, coords)
        if missing:
            refs = MissingSlideRefs(f, missing, len(refs))
        if not region_patch:
            groups.append(
                PatchGroup(_name(attrs, f), refs, coords, attrs=_patch_geometry(attrs))  # type: ignore[arg-type]
            )
            continue
        grid = out_size // region_patch
        geometry: dict[str, Any] = {
            "patch_size": out_size,
            "patch_level": spec.read_level,
            "read_size": read_size,
            "grid": grid,
            "region_size": out_size,
            "region_patch_size": region_patch,
        }
        for src, dst in (("target_mpp", "target_mpp"), ("mpp", "mpp"),
                         ("patch_size_level0", "patch_size_level0")):  # fmt: skip
            if src in attrs:
                geometry[dst] = float(attrs[src]) if "mpp" in src else int(attrs[src])
        groups.append(
            RegionGroup(
                name=_name(attrs, f),
                refs=refs,  # type: ignore[arg-type]
                coords=coords,
                attrs=geometry,
                grid=grid,
            )
        )
    return groups


def _patch_geometry(attrs: dict[str, Any]) -> dict[str, Any]:
    """The features file's patch attributes, exactly as those of the same slide's shards
    (:func:`pathflow.extract.sources._patch_attrs` of the sample JSON the tiler writes)."""
    read_size = int(attrs["patch_size"])
    mpp = float(attrs.get("mpp", 0.0))
    return {
        "patch_size": int(attrs.get("target_patch_size", read_size)),
        "patch_size_level0": int(attrs.get("patch_size_level0", read_size)),
        "patch_level": int(attrs["patch_level"]),
        "read_size": read_size,
        "target_mpp": float(attrs.get("target_mpp", mpp)),
        "mpp": mpp,
    }


def coords_region_groups(
    path: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    region_patch: int = 256,
    quality: int = 90,
    backend: str = "auto",
) -> list[RegionGroup]:
    """One :class:`RegionGroup` per coordinate file, its refs produced from the slide."""
    opts = SlideReadOptions(slides=str(slides) if slides else None, quality=quality,
                            backend=backend)  # fmt: skip
    return [g for g in coords_groups(path, opts, region_patch) if isinstance(g, RegionGroup)]


__all__ = [
    "RegionReadSpec",
    "SlidePatchRefs",
    "SlideReadOptions",
    "SlideReadSpec",
    "SlideRegionRefs",
    "coords_groups",
    "coords_region_groups",
    "is_coords_folder",
]
