"""Regions straight from coordinate files + slides, for ``pathflow extract --model
regions|hipt`` without shards.

Inputs: the output folder of ``pathflow tile --region R`` (its ``coords/<slide>.h5``), a folder
of such files, or CLAM's ``patches/*.h5`` (``coords`` [M, 2] level-0 top-left corners; attrs
``patch_level``, ``patch_size``). The slide of each file is ``--slides DIR`` + the file's stem
(any slide extension), else the ``slide_path`` attribute pathflow writes. Each region is read
at ``patch_level`` (``patch_size`` pixels there), resampled to the region size
(``target_patch_size`` when pathflow tiled at a target mpp, else ``patch_size``), cut into its
grid of ``--region-patch`` sub-patches and encoded by the same Rust code as ``pathflow tile
--shards`` (tiled JPEG TIFF/SVS levels read by the Rust tile reader, other slides by the
slide readers), so features equal those of the same regions extracted from shards.

Reading runs in a background thread a few regions ahead of the model; nothing is held
beyond that (a 4096 px region's sub-patches are a few MB).

Example:
    >>> from pathflow.extract.slide_regions import coords_region_groups
    >>> groups = coords_region_groups("tile_out", slides=None)  # doctest: +SKIP
    >>> groups[0].name, groups[0].num_regions, groups[0].grid  # doctest: +SKIP
    ('cmu_small_region', 2, 4)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.exceptions import ConfigError
from pathflow.extract.sources import PatchRef, RegionGroup, SourceError

#: Slide file extensions looked up in ``--slides``.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".qptiff", ".jpg", ".jpeg", ".png")  # fmt: skip


@dataclass(frozen=True)
class RegionReadSpec:
    """How to produce one slide's regions."""

    slide: str
    read_level: int
    read_size: int
    region_size: int
    region_patch: int
    quality: int = 90
    backend: str = "auto"


class SlideRegionRefs:
    """The sub-patch refs of one slide's regions, produced lazily: iterating reads and
    encodes the regions in a background thread (``chunk`` regions at a time, ``ahead``
    chunks ahead) and yields each region's ``grid x grid`` refs in row-major order. A region
    that cannot be read yields refs carrying the error (the embedder reports it)."""

    def __init__(
        self, spec: RegionReadSpec, coords: npt.NDArray[np.int64], chunk: int = 4, ahead: int = 2
    ) -> None:
        self.spec = spec
        self.coords = coords
        self.grid = spec.region_size // spec.region_patch
        self.chunk = max(1, chunk)
        self.ahead = max(1, ahead)

    def __len__(self) -> int:
        return len(self.coords) * self.grid * self.grid

    def __iter__(self) -> Iterator[PatchRef]:
        from pathflow.threads import background

        s = self.spec
        n = self.grid * self.grid
        try:
            for chunk in background(self._chunks(), self.ahead, "pathflow-regions"):
                for region in chunk:
                    if isinstance(region, str):
                        yield from [PatchRef(s.slide, error=region)] * n
                        continue
                    subs = region[1:]  # the whole region's encoding comes first
                    if len(subs) != n:
                        raise SourceError(f"{s.slide}: region cut into {len(subs)}, not {n}")
                    yield from (PatchRef(s.slide, data=b) for b in subs)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{s.slide}: {exc}") from exc

    def _chunks(self) -> Iterator[list[list[bytes] | str]]:
        """Encoded regions, ``chunk`` at a time (an error string for a region that failed;
        every region fails when the slide cannot be opened)."""
        from pathflow.tiling.sources import PatchSpec, open_source

        s = self.spec
        try:
            source = open_source(
                Path(s.slide),
                s.backend,
                PatchSpec(
                    s.read_level, s.read_size, s.region_size, "jpg", s.quality, s.region_patch
                ),
                "always",
                2,
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
        with h5py.File(files[0], "r") as f:
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


def coords_region_groups(
    path: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    region_patch: int = 256,
    quality: int = 90,
    backend: str = "auto",
) -> list[RegionGroup]:
    """One :class:`RegionGroup` per coordinate file, its refs produced from the slide."""
    import h5py

    files = _coord_files(Path(path))
    if not files:
        raise ConfigError(f"{path}: no coordinate files (*.h5 with coords, or coords/*.h5)")
    sdir = Path(slides) if slides else None
    groups = []
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if "coords" not in h:
                    raise ConfigError(f"{f}: no coords dataset")
                coords = np.asarray(h["coords"][()], np.int64).reshape(-1, 2)
                attrs = {**dict(h.attrs), **dict(h["coords"].attrs)}
        except OSError as exc:
            raise ConfigError(f"{f}: unreadable coordinate file ({exc})") from exc
        if "patch_level" not in attrs or "patch_size" not in attrs:
            raise ConfigError(f"{f}: coords need the patch_level and patch_size attributes")
        read_size = int(attrs["patch_size"])
        region = int(attrs.get("target_patch_size", read_size))
        if region % region_patch:
            raise ConfigError(
                f"{f}: regions of {region} px are not a multiple of --region-patch {region_patch}"
            )
        name = str(attrs.get("name", f.stem))
        if isinstance(attrs.get("name"), bytes):
            name = attrs["name"].decode()
        spec = RegionReadSpec(
            slide=_find_slide(f.stem, sdir, attrs, f),
            read_level=int(attrs["patch_level"]),
            read_size=read_size,
            region_size=region,
            region_patch=region_patch,
            quality=quality,
            backend=backend,
        )
        grid = region // region_patch
        geometry: dict[str, Any] = {
            "patch_size": region,
            "patch_level": spec.read_level,
            "read_size": read_size,
            "grid": grid,
            "region_size": region,
            "region_patch_size": region_patch,
        }
        for src, dst in (("target_mpp", "target_mpp"), ("mpp", "mpp"),
                         ("patch_size_level0", "patch_size_level0")):  # fmt: skip
            if src in attrs:
                geometry[dst] = float(attrs[src]) if "mpp" in src else int(attrs[src])
        groups.append(
            RegionGroup(
                name=name,
                refs=SlideRegionRefs(spec, coords),  # type: ignore[arg-type]
                coords=coords,
                attrs=geometry,
                grid=grid,
            )
        )
    return groups


__all__ = [
    "RegionReadSpec",
    "SlideRegionRefs",
    "coords_region_groups",
    "is_coords_folder",
]
