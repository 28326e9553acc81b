"""Where patch pixels come from when writing shards.

* :class:`NativeTiffSource`: tiled JPEG TIFF/SVS levels read by the Rust core directly
  (positional reads of the tiles, decode, area resampling, JPEG encode, all in parallel
  without the GIL); the only source that can pass tiles through without transcoding.
* :class:`ReaderSource`: any slide the :mod:`pathflow.slide` readers open (NDPI, MRXS, flat
  images...): ``read_region`` in a thread pool (the readers release the GIL while decoding),
  then Rust resampling and encoding.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pathflow import _core
from pathflow.exceptions import InvalidArgumentError

Result = bytes | str  # encoded payload, or an error message


@dataclass
class PatchSpec:
    """What to produce for each coordinate of one slide."""

    read_level: int
    read_size: int
    out_size: int
    format: str = "jpg"
    quality: int = 90
    sub_size: int = 0  # > 0: also cut the output into sub_size patches (HIPT regions)


class PatchSource(Protocol):
    passthrough: bool

    def produce(self, coords0: npt.NDArray[np.int64]) -> list[list[bytes] | str]: ...

    def close(self) -> None: ...


def tiff_level_info(path: Path, level_size: tuple[int, int]) -> dict[str, Any] | None:
    """Tile layout of the TIFF page holding a pyramid level of ``level_size`` (w, h), if it
    is a tiled, JPEG-compressed, 8-bit RGB page; else ``None``."""
    try:
        import tifffile
    except ImportError:  # pragma: no cover
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                if not isinstance(page, tifffile.TiffPage):
                    continue
                if (page.imagewidth, page.imagelength) != tuple(level_size):
                    continue
                if not page.is_tiled or page.compression != 7 or page.samplesperpixel != 3:
                    return None
                if page.bitspersample != 8 or page.planarconfig != 1:
                    return None
                if page.photometric not in (2, 6):
                    return None
                return {
                    "width": int(page.imagewidth),
                    "height": int(page.imagelength),
                    "tile_width": int(page.tilewidth),
                    "tile_height": int(page.tilelength),
                    "offsets": np.asarray(page.dataoffsets, dtype=np.uint64),
                    "counts": np.asarray(page.databytecounts, dtype=np.uint64),
                    "tables": bytes(page.jpegtables or b""),
                    "rgb": int(page.photometric) == 2,
                }
    except Exception:
        return None
    return None


class NativeTiffSource:
    """Patches from a tiled JPEG TIFF level, read and encoded in Rust."""

    def __init__(
        self,
        path: Path,
        info: dict[str, Any],
        downsample: tuple[float, float],
        spec: PatchSpec,
        transcode: str,
    ) -> None:
        self.spec = spec
        self.downsample = downsample
        self.level = _core.TiledLevel(
            str(path),
            info["width"],
            info["height"],
            info["tile_width"],
            info["tile_height"],
            info["offsets"],
            info["counts"],
            info["tables"],
            info["rgb"],
        )
        aligned_tiles = info["tile_width"] == info["tile_height"] == spec.read_size == spec.out_size
        can_pass = aligned_tiles and spec.format == "jpg" and spec.sub_size == 0
        self.passthrough = transcode != "always" and can_pass
        self._tile = info["tile_width"]
        if transcode == "never" and not self.passthrough:
            raise InvalidArgumentError(
                f"{path}: --transcode never, but patches ({spec.read_size} px at level "
                f"{spec.read_level}) are not the slide's native {info['tile_width']}x"
                f"{info['tile_height']} JPEG tiles"
            )

    def level_coords(self, coords0: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        dx, dy = self.downsample
        lx = np.floor(coords0[:, 0] / dx + 1e-9).astype(np.int64)
        ly = np.floor(coords0[:, 1] / dy + 1e-9).astype(np.int64)
        return np.ascontiguousarray(np.stack([lx, ly], axis=1))

    def produce(self, coords0: npt.NDArray[np.int64]) -> list[list[bytes] | str]:
        lc = self.level_coords(coords0)
        s = self.spec
        if self.passthrough and bool(((lc % self._tile) == 0).all()):
            payloads, errors = self.level.passthrough(lc)
        elif s.format == "jpg" and s.sub_size == 0:
            payloads, errors = self.level.patches(lc, s.read_size, s.out_size, s.quality)
        else:
            return self._produce_decoded(lc)
        return [
            [p] if p is not None else (e or "unknown error")
            for p, e in zip(payloads, errors, strict=True)
        ]

    def _produce_decoded(self, lc: npt.NDArray[np.int64]) -> list[list[bytes] | str]:
        """Regions and non-JPEG formats: read and encode in Rust, a few at a time, so memory
        stays bounded even for 4096 px regions read from 8192 px."""
        s = self.spec
        out: list[list[bytes] | str] = []
        step = max(1, min(64, (256 << 20) // max(1, s.read_size * s.read_size * 3)))
        for start in range(0, len(lc), step):
            arrays: list[np.ndarray] = []
            bad: dict[int, str] = {}
            part = lc[start : start + step].tolist()
            for i, (x, y) in enumerate(part):
                try:
                    arrays.append(self.level.read_region(x, y, s.read_size, s.read_size))
                except Exception as exc:
                    bad[i] = str(exc)
            encoded = iter(encode_arrays(arrays, s))
            out.extend(bad[i] if i in bad else next(encoded) for i in range(len(part)))
        return out

    def close(self) -> None:
        del self.level


class ReaderSource:
    """Patches through a :class:`~pathflow.slide.base.SlideReader` in a thread pool."""

    passthrough = False

    def __init__(self, reader: Any, spec: PatchSpec, threads: int) -> None:
        self.reader = reader
        self.spec = spec
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="pathflow-read")

    def _read(self, xy: tuple[int, int]) -> np.ndarray | str:
        try:
            return self.reader.read_region(xy, self.spec.read_level, (self.spec.read_size,) * 2)
        except Exception as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def produce(self, coords0: npt.NDArray[np.int64]) -> list[list[bytes] | str]:
        s = self.spec
        step = max(1, min(256, (256 << 20) // max(1, s.read_size * s.read_size * 3)))
        out: list[list[bytes] | str] = []
        for start in range(0, len(coords0), step):
            part = coords0[start : start + step]
            reads = list(self.pool.map(self._read, [tuple(c) for c in part.tolist()]))
            arrays = [r for r in reads if not isinstance(r, str)]
            encoded = iter(encode_arrays(arrays, s)) if arrays else iter(())
            out.extend(r if isinstance(r, str) else next(encoded) for r in reads)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.reader.close()


def encode_arrays(arrays: list[np.ndarray], spec: PatchSpec) -> list[list[bytes]]:
    """Resample to ``out_size`` and encode (in Rust, in parallel); with ``sub_size`` also
    cut each output into its grid of sub-patches (row-major) after the full image."""
    if not arrays:
        return []
    if spec.sub_size:
        return _core.encode_regions(arrays, spec.out_size, spec.sub_size, spec.quality, spec.format)
    return [[b] for b in _core.encode_images(arrays, spec.out_size, spec.format, spec.quality)]


def sub_grid(out_size: int, sub_size: int) -> int:
    """Sub-patches per side of a region."""
    if sub_size <= 0 or out_size % sub_size:
        raise InvalidArgumentError(
            f"region size {out_size} is not a multiple of the region patch size {sub_size}"
        )
    return out_size // sub_size


def open_source(
    path: Path,
    backend: str,
    spec: PatchSpec,
    transcode: str,
    threads: int,
) -> PatchSource:
    """The fastest source that can produce ``spec`` for this slide."""
    from pathflow.slide import open_slide

    reader = open_slide(path, backend=backend)  # pixels only: no mpp needed
    if path.suffix.lower() in (".svs", ".tif", ".tiff"):
        info = tiff_level_info(path, reader.level_dimensions[spec.read_level])
        if info is not None:
            ds = reader.level_downsample_xy(spec.read_level)
            reader.close()
            return NativeTiffSource(path, info, ds, spec, transcode)
    if transcode == "never":
        reader.close()
        raise InvalidArgumentError(
            f"{path}: --transcode never needs a tiled JPEG TIFF/SVS level to pass through"
        )
    return ReaderSource(reader, spec, threads)
