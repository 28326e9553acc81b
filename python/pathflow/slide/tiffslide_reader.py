"""Slide reader backed by tiffslide (pure Python: tifffile + imagecodecs + zarr).

Reads TIFF-based formats (Aperio SVS, generic pyramidal TIFF, Hamamatsu NDPI, Leica SCN,
Philips TIFF...). tiffslide zero-pads regions that extend past the slide; the padding is
turned white here so that every backend agrees with OpenSlide.

Example:
    >>> from pathflow.slide import open_slide
    >>> slide = open_slide("CMU-1.svs", backend="tiffslide")  # doctest: +SKIP
    >>> slide.read_region((0, 0), 0, (256, 256)).shape  # doctest: +SKIP
    (256, 256, 3)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pathflow.slide.base import SlideReader
from pathflow.slide.mpp import mean_mpp
from pathflow.slide.pixels import level_origin, region_overlaps, to_rgb_uint8, white, whiten_outside
from pathflow.slide.sniff import sniff_format, tiff_resolution_mpp

__all__ = ["TiffSlideReader"]


@functools.cache
def _tiffslide() -> ModuleType | None:
    try:
        import tiffslide
    except ImportError:
        return None
    return tiffslide


class TiffSlideReader(SlideReader):
    """Reader using :class:`tiffslide.TiffSlide`."""

    backend = "tiffslide"
    package = "tiffslide"

    @classmethod
    def is_available(cls) -> bool:
        return _tiffslide() is not None

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        return kind == "tiff"

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        mod = _tiffslide()
        if mod is None:  # pragma: no cover - checked by open_slide
            raise ImportError("tiffslide is not importable")
        recognised = sniff_format(self.path) == "tiff"
        self._check_tiff_header()
        try:
            self._slide: Any = mod.TiffSlide(os.fspath(self.path))
        except Exception as exc:
            raise self._open_failed(exc, recognised=recognised) from None
        try:
            try:
                dims = self._slide.level_dimensions
                downsamples = self._slide.level_downsamples
                raw_props = dict(self._slide.properties)
            except Exception as exc:
                raise self._open_failed(exc, recognised=recognised) from None
            props = {k: v for k, v in raw_props.items() if v is not None}
            file_mpp = mean_mpp(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"))
            if file_mpp is None:
                file_mpp = tiff_resolution_mpp(self.path)
            self._set_metadata(
                level_dimensions=dims,
                level_downsamples=downsamples,
                properties=props,
                file_mpp=file_mpp,
                magnification=props.get("tiffslide.objective-power"),
            )
        except BaseException:
            self.close()
            raise

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        level_size = self.level_dimensions[level]
        origin = level_origin(location, self.level_downsamples[level])
        if not region_overlaps(origin, size, level_size):
            return white(size)  # tiffslide would warn and return zeros
        arr = self._slide.read_region(location, level, size, as_array=True, padding=True)
        rgb = to_rgb_uint8(np.asarray(arr))
        if not rgb.flags.writeable:
            rgb = rgb.copy()
        return whiten_outside(rgb, origin, level_size)

    def _close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
