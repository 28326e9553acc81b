"""The :class:`SlideReader` interface shared by all slide backends.

A reader wraps one open slide file. Coordinates follow OpenSlide: ``location`` is the
top-left corner in level-0 pixels ``(x, y)``, ``size`` is ``(width, height)`` in pixels of
the requested level, and pixels come back as an ``(H, W, 3)`` C-contiguous ``uint8`` RGB
array. Pixels outside the slide, and pixels the file marks fully transparent, are white
(255, 255, 255), exactly like OpenSlide's RGBA output composited onto a white background.

The helpers readers share live beside it and are re-exported here: file sniffing
(:mod:`~pathflow.slide.sniff`), mpp values and tables (:mod:`~pathflow.slide.mpp`) and pixel
coercion (:mod:`~pathflow.slide.pixels`).

Example:
    >>> from pathflow.slide import open_slide
    >>> from pathflow.slide.base import resolve_mpp
    >>> with open_slide("CMU-1.svs") as slide:  # doctest: +SKIP
    ...     tile = slide.read_region((1000, 1000), 0, (256, 256))
    ...     mpp = resolve_mpp(slide, None)  # 0.499, or MissingMppError with a hint
"""

from __future__ import annotations

import abc
import contextlib
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pathflow.exceptions import (
    CorruptSlideError,
    InvalidArgumentError,
    SlideError,
    UnsupportedFormatError,
)
from pathflow.slide.mpp import (
    MPP_MAX,
    MPP_MIN,
    _to_float,
    check_mpp_override,
    load_mpp_csv,
    lookup_mpp,
    mean_mpp,
    resolve_mpp,
)
from pathflow.slide.pixels import (
    composite_on_white,
    level_origin,
    region_overlaps,
    to_rgb_uint8,
    white,
    whiten_outside,
)
from pathflow.slide.sniff import (
    _exc_text,
    _one_line,
    sniff_format,
    tiff_header_problem,
    tiff_resolution_mpp,
)

__all__ = [
    "MPP_MAX",
    "MPP_MIN",
    "SlideReader",
    "check_mpp_override",
    "composite_on_white",
    "level_origin",
    "load_mpp_csv",
    "lookup_mpp",
    "mean_mpp",
    "region_overlaps",
    "resolve_mpp",
    "sniff_format",
    "tiff_header_problem",
    "tiff_resolution_mpp",
    "to_rgb_uint8",
    "white",
    "whiten_outside",
]


def _int_pair(value: Any, what: str) -> tuple[int, int]:
    try:
        a, b = value
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a pair of integers, got {value!r}") from None


# --------------------------------------------------------------------------- the interface


class SlideReader(abc.ABC):
    """One open slide file read through one backend library.

    Subclasses open the file in ``__init__`` (raising :class:`CorruptSlideError` or
    :class:`UnsupportedFormatError` with a one-line message), then call
    :meth:`_set_metadata`, and implement :meth:`_read_region` and :meth:`_close`.

    Attributes:
        path: The slide file.
        backend: Registry name of the backend (class attribute).
        package: pip package that provides the backend (class attribute).
    """

    backend: ClassVar[str] = ""
    package: ClassVar[str] = ""

    path: Path
    _level_dimensions: tuple[tuple[int, int], ...]
    _level_downsamples: tuple[float, ...]
    _properties: dict[str, str]
    _file_mpp: float | None
    _magnification: float | None

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        self.path = Path(os.fspath(path))
        self._closed = False
        self._mpp_override = check_mpp_override(mpp) if mpp is not None else None
        self._level_dimensions = ()
        self._level_downsamples = ()
        self._properties = {}
        self._file_mpp = None
        self._magnification = None

    # ---- backend discovery (overridden by subclasses)

    @classmethod
    def is_available(cls) -> bool:
        """Whether the backend's library can be imported here."""
        return True

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        """Cheap check used by ``open_slide(backend="auto")``; ``kind`` is :func:`sniff_format`."""
        return True

    # ---- to implement

    @abc.abstractmethod
    def _read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Return the region as an ``(h, w, C)`` array (any of the layouts that
        :func:`to_rgb_uint8` accepts), already white outside the slide.
        Arguments are validated; ``w, h >= 1``."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the library handle."""

    # ---- helpers for subclasses

    def _set_metadata(
        self,
        *,
        level_dimensions: Sequence[Sequence[int]],
        level_downsamples: Sequence[float],
        properties: dict[str, str],
        file_mpp: float | None,
        magnification: float | None,
    ) -> None:
        dims = tuple((int(w), int(h)) for w, h in level_dimensions)
        if not dims or any(w <= 0 or h <= 0 for w, h in dims):
            problem = tiff_header_problem(self.path) if sniff_format(self.path) == "tiff" else None
            raise CorruptSlideError(
                f"{self.path}: {self.backend}: "
                + (problem or f"no readable image level (level sizes {list(dims)})")
            )
        if len(level_downsamples) != len(dims):
            raise CorruptSlideError(
                f"{self.path}: {self.backend}: {len(dims)} levels but "
                f"{len(level_downsamples)} downsamples"
            )
        self._level_dimensions = dims
        self._level_downsamples = tuple(float(d) for d in level_downsamples)
        self._properties = {str(k): str(v) for k, v in properties.items()}
        self._file_mpp = _to_float(file_mpp)
        self._magnification = _to_float(magnification)

    def _check_tiff_header(self) -> None:
        """Fail fast, before the library prints its own complaints, on a truncated TIFF."""
        if sniff_format(self.path) == "tiff":
            problem = tiff_header_problem(self.path)
            if problem is not None:
                raise self._corrupt(problem)

    def _corrupt(self, detail: object) -> CorruptSlideError:
        return CorruptSlideError(f"{self.path}: {self.backend}: {_one_line(detail)}")

    def _open_failed(self, exc: BaseException, recognised: bool) -> SlideError:
        """Map a library's open error: a file in a format this backend handles is corrupt,
        anything else is unsupported."""
        detail = _exc_text(exc)
        problem = tiff_header_problem(self.path) if sniff_format(self.path) == "tiff" else None
        if problem is not None:  # a TIFF (SVS, NDPI...) truncated or with a broken header
            return self._corrupt(problem)
        if recognised:
            return self._corrupt(detail)
        return UnsupportedFormatError(
            f"{self.path}: not a supported slide format for the {self.backend} backend ({detail})"
        )

    # ---- metadata

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of each level, level 0 first."""
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to level 0, as the backend library reports it.

        Libraries differ in the last digits (cuCIM stores float32), e.g. for a 2500 px level 0
        and a 312 px level: OpenSlide/tiffslide 8.012820512820513, cuCIM 8.01282024383545.
        """
        return self._level_downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return self._level_dimensions[0]

    @property
    def file_mpp(self) -> float | None:
        """Microns per pixel at level 0 as stored in the file (mean of x and y), or ``None``.

        Not checked for plausibility; see :func:`resolve_mpp`.
        """
        return self._file_mpp

    @property
    def mpp(self) -> float | None:
        """The ``mpp=`` override given to ``open_slide`` if any, else :attr:`file_mpp`."""
        return self._mpp_override if self._mpp_override is not None else self._file_mpp

    @property
    def magnification(self) -> float | None:
        """Objective power of level 0 (e.g. 20.0) if the file says, else ``None``."""
        return self._magnification

    @property
    def properties(self) -> dict[str, str]:
        """The library's metadata as strings (a copy)."""
        return dict(self._properties)

    @property
    def closed(self) -> bool:
        return self._closed

    def level_downsample_xy(self, level: int) -> tuple[float, float]:
        """Downsample estimated from the level sizes: ``(W0 / Wl, H0 / Hl)`` (as in CLAM)."""
        level = self._check_level(level)
        (w0, h0), (w, h) = self._level_dimensions[0], self._level_dimensions[level]
        return w0 / w, h0 / h

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Largest level whose downsample is <= ``downsample``; 0 if it is below level 0's.

        A line-by-line port of ``openslide_get_best_level_for_downsample`` (OpenSlide 3.3
        to 4.0): strict ``<`` comparisons against the library's downsamples, no tolerance,
        so 7.99 picks the 4x level when the next one is 8.0, and NaN picks the last level.
        """
        ds = float(downsample)
        downsamples = self._level_downsamples
        if ds < downsamples[0]:
            return 0
        for i in range(1, len(downsamples)):
            if ds < downsamples[i]:
                return i - 1
        return len(downsamples) - 1

    # ---- pixels

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a region as an ``(h, w, 3)`` C-contiguous ``uint8`` RGB array.

        Args:
            location: ``(x, y)`` of the top-left pixel in level-0 coordinates; may be
                negative or past the edge.
            level: Pyramid level, ``0 <= level < level_count``.
            size: ``(w, h)`` in pixels of ``level``; zero gives an empty array.

        Pixels outside the slide and fully transparent pixels are white (255); partly
        transparent ones are composited onto white, as OpenSlide's RGBA would be.

        Raises:
            InvalidArgumentError: bad level, negative size, non-integer coordinates.
            CorruptSlideError: the library failed to decode the region.
        """
        self._check_open()
        x, y = _int_pair(location, "location")
        w, h = _int_pair(size, "size")
        level = self._check_level(level)
        if w < 0 or h < 0:
            raise InvalidArgumentError(f"size must be non-negative, got {(w, h)}")
        if w == 0 or h == 0:
            return white((w, h))
        try:
            arr = self._read_region((x, y), level, (w, h))
            out = to_rgb_uint8(np.asarray(arr))
        except (SlideError, MemoryError):
            raise
        except Exception as exc:
            raise self._corrupt(
                f"cannot read region location={(x, y)} level={level} size={(w, h)}: "
                f"{_exc_text(exc)}"
            ) from exc
        if out.shape != (h, w, 3):
            raise self._corrupt(
                f"backend returned shape {out.shape} for region size {(w, h)} at level {level}"
            )
        return out

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as an ``(H, W, 3)`` RGB array (mind the memory at level 0)."""
        level = self._check_level(level)
        return self.read_region((0, 0), level, self._level_dimensions[level])

    def thumbnail(self, max_size: int) -> Image.Image:
        """RGB thumbnail whose longer side is at most ``max_size``, aspect ratio preserved.

        Same recipe as OpenSlide's ``get_thumbnail``: read the best level for the downsample,
        then ``PIL.Image.thumbnail`` with Lanczos. Never enlarges.
        """
        try:
            max_size = operator.index(max_size)
        except TypeError:
            raise InvalidArgumentError(f"max_size must be an integer, got {max_size!r}") from None
        if max_size < 1:
            raise InvalidArgumentError(f"max_size must be >= 1, got {max_size}")
        w0, h0 = self.dimensions
        level = self.get_best_level_for_downsample(max(w0, h0) / max_size)
        img = Image.fromarray(self.read_level(level))
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        return img

    # ---- lifecycle

    def close(self) -> None:
        """Release the file; idempotent. Reads after closing raise InvalidArgumentError."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        mpp = f"{self.mpp:.4g}" if self.mpp is not None else "None"
        return (
            f"{type(self).__name__}(path='{self.path}', backend='{self.backend}', "
            f"dimensions={self.dimensions if self._level_dimensions else None}, "
            f"levels={self.level_count}, mpp={mpp}{state})"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{self.path}: slide reader is closed")

    def _check_level(self, level: int) -> int:
        try:
            level = operator.index(level)
        except TypeError:
            raise InvalidArgumentError(f"level must be an integer, got {level!r}") from None
        if not 0 <= level < self.level_count:
            raise InvalidArgumentError(
                f"{self.path}: level {level} out of range (slide has {self.level_count} levels)"
            )
        return level
