"""Slide reader for flat images (JPEG, PNG, BMP, single-level TIFF) decoded with Pillow.

The image is one level. It is decoded on the first pixel access and kept in memory as an
RGB array; :meth:`ImageReader.thumbnail` uses Pillow's JPEG draft mode instead, so a
thumbnail of a huge JPEG does not decode it at full size. Pillow's decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``) is lifted while this module opens a file, because scanned
images routinely exceed it.

The mpp comes from the resolution metadata when it has a physical unit: JFIF/EXIF/PNG
``pHYs`` DPI (``25400 / dpi`` um/px) or, for TIFF, ``X/YResolution`` with
``ResolutionUnit``. JFIF "aspect ratio only" densities (unit 0) give ``None``. Values like
72 dpi (352.8 um/px) are reported as found; :func:`~pathflow.slide.base.resolve_mpp`
rejects them.

Example:
    >>> from pathflow.slide import open_slide
    >>> slide = open_slide("tma_spots.jpeg")  # doctest: +SKIP
    >>> slide.backend, slide.level_count, slide.mpp  # doctest: +SKIP
    ('image', 1, None)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pathflow.slide.base import SlideReader
from pathflow.slide.mpp import mean_mpp
from pathflow.slide.pixels import level_origin, region_overlaps, to_rgb_uint8, white
from pathflow.slide.sniff import sniff_format, tiff_resolution_mpp

__all__ = ["ImageReader"]

_IMAGE_KINDS = ("jpeg", "png", "bmp", "tiff")
_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved: int | None = None


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Lift Pillow's decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) for the block.

    Reference-counted, so concurrent decodes in several threads restore the user's value
    only when the last one finishes.
    """
    global _limit_users, _limit_saved
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def _decode(img: Image.Image) -> np.ndarray:
    """Decode a Pillow image (first frame) to an (H, W, 3) uint8 RGB array."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        return to_rgb_uint8(arr)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        return to_rgb_uint8(np.asarray(img.convert("RGBA")))
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img))
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def _dpi_mpp(info: dict[str, Any]) -> float | None:
    dpi = info.get("dpi")
    if not dpi:
        return None
    try:
        dx, dy = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    return mean_mpp(25400.0 / dx if dx > 0 else None, 25400.0 / dy if dy > 0 else None)


class ImageReader(SlideReader):
    """Single-level reader for JPEG/PNG/BMP/TIFF images via Pillow."""

    backend = "image"
    package = "pillow"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        return kind in _IMAGE_KINDS

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()
        kind = sniff_format(self.path)
        recognised = kind in _IMAGE_KINDS
        self._check_tiff_header()
        try:
            with _no_pixel_limit(), Image.open(self.path) as img:
                size = img.size
                fmt = img.format or ""
                info = dict(img.info)
        except UnidentifiedImageError as exc:
            raise self._open_failed(exc, recognised=recognised) from None
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's parsers raise these
            raise self._open_failed(exc, recognised=recognised) from None
        file_mpp = tiff_resolution_mpp(self.path) if kind == "tiff" else _dpi_mpp(info)
        props = {"image.format": fmt, "image.width": str(size[0]), "image.height": str(size[1])}
        for key in ("dpi", "jfif_unit", "jfif_density", "compression"):
            if key in info:
                props[f"image.{key}"] = str(info[key])
        self._set_metadata(
            level_dimensions=[size],
            level_downsamples=[1.0],
            properties=props,
            file_mpp=file_mpp,
            magnification=None,
        )

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                with _no_pixel_limit(), Image.open(self.path) as img:
                    img.load()  # a truncated file raises OSError (-> CorruptSlideError)
                    pixels = _decode(img)
                if pixels.shape[:2] != (self.dimensions[1], self.dimensions[0]):
                    raise self._corrupt(f"decoded size {pixels.shape[1::-1]} != header size")
                self._pixels = pixels
            return self._pixels

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        origin = level_origin(location, 1.0)
        if not region_overlaps(origin, size, self.dimensions):
            return white(size)
        pixels = self._load()
        (x, y), (w, h) = origin, size
        width, height = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return pixels[y0:y1, x0:x1].copy()
        out = white(size)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_size: int) -> Image.Image:
        """RGB thumbnail, longer side at most ``max_size``; JPEGs are decoded at reduced scale."""
        if self._pixels is not None or self.closed:
            return super().thumbnail(max_size)
        if isinstance(max_size, bool) or not isinstance(max_size, int | np.integer):
            return super().thumbnail(max_size)  # raises InvalidArgumentError
        if max_size < 1:
            return super().thumbnail(max_size)
        try:
            with _no_pixel_limit(), Image.open(self.path) as img:
                img.draft("RGB", (max_size, max_size))
                img.load()
                thumb = Image.fromarray(_decode(img))
        except Exception as exc:
            raise self._corrupt(f"cannot decode image: {exc}") from exc
        thumb.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        return thumb

    def _close(self) -> None:
        self._pixels = None
