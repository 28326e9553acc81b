"""Slide reader backed by NVIDIA cuCIM (``cucim-cu12`` / ``cucim-cu13``).

``CuImage`` decodes TIFF-based slides (Aperio SVS, generic tiled TIFF, Philips TIFF) on the
CPU: no GPU is needed, ``read_region`` is always called with ``device="cpu"`` and the result
is copied into a NumPy array.

Quirks handled here:

* cuCIM fills pixels outside the slide white for JPEG-compressed tiles but black for others,
  and rejects a size larger than the level ("Invalid size (it exceeds the original image
  width)"); only the part inside the level is read and it is pasted onto white.
* The level downsamples are float32 (8.01282024383545 where OpenSlide says
  8.012820512820513); they are kept as reported.
* ``spacing()`` is ``[1, 1]`` with empty units for Aperio files, so the mpp comes from the
  Aperio ``MPP`` field, else from the TIFF resolution tags (recomputed in double precision
  so that it matches OpenSlide and tiffslide), else from ``spacing()`` if it has a unit.
* A tile that fails to decode does not raise: cuCIM prints
  ``ERROR ... while reading JPEG header`` and returns zeros. Use another backend to detect
  damaged tiles.

Example:
    >>> from pathflow.slide import open_slide
    >>> slide = open_slide("CMU-1.svs", backend="cucim")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pathflow.slide.base import SlideReader
from pathflow.slide.mpp import mean_mpp
from pathflow.slide.pixels import level_origin, region_overlaps, to_rgb_uint8, white
from pathflow.slide.sniff import sniff_format, tiff_resolution_mpp

__all__ = ["CuCIMReader"]

_UNIT_TO_UM = {
    "micrometer": 1.0,
    "micrometers": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "millimeter": 1000.0,
    "mm": 1000.0,
    "centimeter": 10000.0,
    "cm": 10000.0,
    "nanometer": 0.001,
    "nm": 0.001,
}
_TIFF_UNIT_SCALE = {"inch": 25400.0, "centimeter": 10000.0, "cm": 10000.0}


def _blocked_by_torch() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and not torch.cuda.is_available()


@functools.cache
def _cuimage_class() -> Any:

    if _blocked_by_torch():
        # Seen with cucim-cu13 and the CUDA build of torch on a machine without a GPU driver:
        # once torch is imported, cuCIM blocks forever (cuFile start-up) when it opens a file.
        warnings.warn(
            "cuCIM is not used in a process that imported torch on a machine without a CUDA "
            "device (it hangs there); use openslide or tiffslide",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    try:
        from cucim import CuImage  # type: ignore[attr-defined]
    except Exception:
        return None
    return CuImage


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(value)
    elif value is not None:
        out[prefix] = str(value)


def _cucim_mpp(meta: dict[str, Any], spacing: list[float], units: list[str]) -> float | None:
    aperio = meta.get("aperio") or {}
    mpp = mean_mpp(aperio.get("MPP"), aperio.get("MPP"))
    if mpp is not None:
        return mpp
    tiff = meta.get("tiff") or {}
    scale = _TIFF_UNIT_SCALE.get(str(tiff.get("resolution_unit", "")).lower())
    if scale is not None:
        try:
            mpp = mean_mpp(scale / float(tiff["x_resolution"]), scale / float(tiff["y_resolution"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            mpp = None
        if mpp is not None:
            return mpp
    if len(spacing) >= 2 and len(units) >= 2:
        fx, fy = _UNIT_TO_UM.get(units[0].lower()), _UNIT_TO_UM.get(units[1].lower())
        if fx is not None and fy is not None:
            # spacing() is (y, x) like the dims "YXC"
            return mean_mpp(spacing[1] * fx, spacing[0] * fy)
    return None


def _level0_coord(c: int, ds: float) -> int:
    """A level-0 coordinate that :func:`level_origin` maps to level coordinate ``c >= 0``."""
    x = math.ceil(c * ds)
    while x > 0 and int(x / ds) > c:
        x -= 1
    while int(x / ds) < c:
        x += 1
    return x


class CuCIMReader(SlideReader):
    """Reader using :class:`cucim.CuImage`, on the CPU."""

    backend = "cucim"
    package = "cucim-cu12 (or cucim-cu13 for CUDA 13)"

    @classmethod
    def is_available(cls) -> bool:
        # Only look for the package here: importing cucim is slow and, after torch has been
        # imported, can stall; it is imported when a slide is actually opened with it.
        import importlib.util

        if _blocked_by_torch():  # see _cuimage_class
            return False
        try:
            return importlib.util.find_spec("cucim") is not None
        except (ImportError, ValueError):
            return False

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        return kind == "tiff"

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        super().__init__(path, mpp=mpp)
        cuimage = _cuimage_class()
        if cuimage is None:  # pragma: no cover - checked by open_slide
            raise ImportError("cucim is not importable")
        recognised = sniff_format(self.path) == "tiff"
        self._check_tiff_header()
        try:
            self._img: Any = cuimage(os.fspath(self.path))
        except Exception as exc:
            raise self._open_failed(exc, recognised=recognised) from None
        try:
            try:
                res = self._img.resolutions
                meta = dict(self._img.metadata)
                spacing = [float(s) for s in self._img.spacing()]
                units = [str(u) for u in self._img.spacing_units()]
            except Exception as exc:
                raise self._open_failed(exc, recognised=recognised) from None
            props: dict[str, str] = {}
            _flatten("", meta, props)
            file_mpp = _cucim_mpp(meta, spacing, units)
            if file_mpp is None and recognised:
                file_mpp = tiff_resolution_mpp(self.path)
            self._set_metadata(
                level_dimensions=res["level_dimensions"],
                level_downsamples=res["level_downsamples"],
                properties=props,
                file_mpp=file_mpp,
                magnification=(meta.get("aperio") or {}).get("AppMag"),
            )
        except BaseException:
            self.close()
            raise

    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        level_size = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        (lx0, ly0), (w, h), (lw, lh) = level_origin(location, ds), size, level_size
        if not region_overlaps((lx0, ly0), size, level_size):
            return white(size)
        # cuCIM rejects sizes larger than the level and pads with black or white depending
        # on the compression, so read only the part inside the level and paste it on white.
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + w, lw), min(ly0 + h, lh)
        x = location[0] if cx0 == lx0 else _level0_coord(cx0, ds)
        y = location[1] if cy0 == ly0 else _level0_coord(cy0, ds)
        region = self._img.read_region(
            location=(x, y), size=(cx1 - cx0, cy1 - cy0), level=level, device="cpu"
        )
        # copy: the array must not depend on the lifetime of the CuImage region
        inside = to_rgb_uint8(np.array(region, copy=True))
        if (cx0, cy0, cx1, cy1) == (lx0, ly0, lx0 + w, ly0 + h):
            return inside
        out = white(size)
        out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = inside
        return out

    def _close(self) -> None:
        img = getattr(self, "_img", None)
        if img is not None:
            img.close()
