"""Slide reader backed by OpenSlide (``openslide-python`` with the ``openslide-bin`` library).

Handles every format OpenSlide knows (Aperio SVS, Hamamatsu, Leica, MIRAX, Philips TIFF,
Ventana, Zeiss, DICOM, generic tiled TIFF...). OpenSlide returns RGBA; it is composited
onto white, so pixels outside the slide come back as 255.

Example:
    >>> from pathflow.slide import open_slide
    >>> slide = open_slide("CMU-1.svs", backend="openslide")  # doctest: +SKIP
    >>> slide.mpp, slide.magnification  # doctest: +SKIP
    (0.499, 20.0)
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
from pathflow.slide.pixels import composite_on_white
from pathflow.slide.sniff import tiff_resolution_mpp

__all__ = ["OpenSlideReader"]


@functools.cache
def _openslide() -> ModuleType | None:
    try:
        import openslide
    except (ImportError, OSError):  # OSError: shared library not found
        return None
    return openslide


class OpenSlideReader(SlideReader):
    """Reader using :class:`openslide.OpenSlide`."""

    backend = "openslide"
    package = "openslide-python openslide-bin"

    @classmethod
    def is_available(cls) -> bool:
        return _openslide() is not None

    @classmethod
    def detect_format(cls, path: str | os.PathLike[str]) -> str | None:
        """OpenSlide's vendor name for the file (``"aperio"``, ``"generic-tiff"``...) or None."""
        mod = _openslide()
        if mod is None:
            return None
        try:
            return mod.OpenSlide.detect_format(os.fspath(path))
        except Exception:
            return None

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        return kind not in ("jpeg", "png") and cls.detect_format(path) is not None

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        mod = _openslide()
        if mod is None:  # pragma: no cover - checked by open_slide
            raise ImportError("openslide is not importable")
        vendor = self.detect_format(self.path)
        try:
            self._slide: Any = mod.OpenSlide(os.fspath(self.path))
        except mod.OpenSlideError as exc:  # includes OpenSlideUnsupportedFormatError
            raise self._open_failed(exc, recognised=vendor is not None) from None
        props = dict(self._slide.properties)
        file_mpp = mean_mpp(props.get(mod.PROPERTY_NAME_MPP_X), props.get(mod.PROPERTY_NAME_MPP_Y))
        if file_mpp is None and vendor == "generic-tiff":
            file_mpp = tiff_resolution_mpp(self.path)
        try:
            self._set_metadata(
                level_dimensions=self._slide.level_dimensions,
                level_downsamples=self._slide.level_downsamples,
                properties=props,
                file_mpp=file_mpp,
                magnification=props.get(mod.PROPERTY_NAME_OBJECTIVE_POWER),
            )
        except BaseException:
            self.close()
            raise

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region(location, level, size))
        return composite_on_white(rgba)

    def _close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
