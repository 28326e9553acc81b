"""The :class:`SlideReader` interface shared by all slide backends, plus mpp helpers.

A reader wraps one open slide file. Coordinates follow OpenSlide: ``location`` is the
top-left corner in level-0 pixels ``(x, y)``, ``size`` is ``(width, height)`` in pixels of
the requested level, and pixels come back as an ``(H, W, 3)`` C-contiguous ``uint8`` RGB
array. Pixels outside the slide, and pixels the file marks fully transparent, are white
(255, 255, 255), exactly like OpenSlide's RGBA output composited onto a white background.

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
import csv
import math
import operator
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pathflow.exceptions import (
    ConfigError,
    CorruptSlideError,
    InvalidArgumentError,
    MissingMppError,
    SlideError,
    UnsupportedFormatError,
)

__all__ = [
    "MPP_MAX",
    "MPP_MIN",
    "SlideReader",
    "check_mpp_override",
    "load_mpp_csv",
    "lookup_mpp",
    "resolve_mpp",
    "sniff_format",
    "tiff_resolution_mpp",
]

#: Plausible microns-per-pixel range for a scanned slide (level 0), inclusive.
MPP_MIN = 0.05
MPP_MAX = 20.0

_WHITE = 255


def _one_line(text: object) -> str:
    """Collapse a (library) message onto one line."""
    out = " ".join(str(text).split())
    return out or "unknown error"


def _exc_text(exc: BaseException) -> str:
    msg = _one_line(exc) if str(exc).strip() else ""
    return msg or type(exc).__name__


# --------------------------------------------------------------------------- file sniffing


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """Guess a file's container from its first bytes.

    Returns:
        ``"tiff"`` (classic or BigTIFF, so also SVS, NDPI...), ``"jpeg"``, ``"png"``,
        ``"bmp"``, ``"gif"``, ``"webp"``, ``"jp2"`` or ``None`` if unknown or unreadable.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    return None


def tiff_header_problem(path: str | os.PathLike[str]) -> str | None:
    """Explain why a file with a TIFF signature has no readable image directory, if it can.

    Checks the first-IFD offset of the header against the file size, which catches the
    common case of a slide truncated during copy (TIFF writers put the IFDs at the end).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        return _exc_text(exc)
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        return None
    endian = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(endian + "H", head[2:4])[0]
    if magic == 42:
        offset = struct.unpack(endian + "I", head[4:8])[0]
    elif magic == 43 and len(head) >= 16:
        offset = struct.unpack(endian + "Q", head[8:16])[0]
    else:
        return None
    if offset == 0:
        return "TIFF header points to no image directory"
    if offset >= size:
        return (
            f"first TIFF directory at byte {offset} is beyond the end of the file "
            f"({size} bytes); the file is probably truncated"
        )
    return None


def tiff_resolution_mpp(path: str | os.PathLike[str]) -> float | None:
    """Microns per pixel from the first page's TIFF ``X/YResolution`` + ``ResolutionUnit``.

    Same rules as tiffslide's generic-TIFF parser (and OpenSlide's): the unit tag must be
    present and be inch, centimetre, millimetre or micrometre. Returns the mean of x and y,
    or ``None`` when the tags are absent, unitless, zero or the file is not a readable TIFF.
    """
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile is a dependency
        return None
    scale_by_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.pages:
                return None
            tags = tf.pages[0].tags
            unit_tag = tags.get("ResolutionUnit")
            xres_tag = tags.get("XResolution")
            yres_tag = tags.get("YResolution")
            if unit_tag is None or xres_tag is None or yres_tag is None:
                return None
            scale = scale_by_unit.get(int(unit_tag.value))
            xres, yres = _rational(xres_tag.value), _rational(yres_tag.value)
    except Exception:
        return None
    if scale is None or not xres or not yres:
        return None
    return mean_mpp(scale / xres, scale / yres)


def _rational(value: Any) -> float | None:
    try:
        if isinstance(value, tuple | list):
            num, den = value
            return float(num) / float(den) if den else None
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_float(value: Any) -> float | None:
    """Parse a metadata value as a positive finite float, else ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def mean_mpp(x: Any, y: Any) -> float | None:
    """Average of the x and y mpp; one of them alone if only one is usable."""
    fx, fy = _to_float(x), _to_float(y)
    if fx is not None and fy is not None:
        return (fx + fy) / 2.0
    return fx if fx is not None else fy


# --------------------------------------------------------------------------- pixel helpers


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA ``uint8`` onto white; return RGB.

    Fully transparent pixels become exactly 255; opaque ones keep their colour.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.size == 0 or bool((alpha == 255).all()):
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + _WHITE * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Coerce a decoded region (gray, gray+alpha, RGB, RGBA; 8 or 16 bit) to RGB ``uint8``."""
    if arr.ndim == 2:
        arr = arr[..., np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    channels = arr.shape[2]
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 2:  # gray + alpha
        arr = composite_on_white(
            np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], 2)
        )
    elif channels == 4:
        arr = composite_on_white(arr)
    elif channels > 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def level_origin(location: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Top-left pixel of a region in level coordinates: ``int(x / ds)`` (truncation).

    This is the mapping used by tiffslide and cuCIM. OpenSlide instead renders at the exact
    fractional position ``x / ds``, so at levels with a non-integer downsample its pixels can
    be shifted by a fraction of a pixel and interpolated.
    """
    x, y = location
    return int(x / downsample), int(y / downsample)


def whiten_outside(
    arr: np.ndarray, origin: tuple[int, int], level_size: tuple[int, int]
) -> np.ndarray:
    """Set the pixels of a region that fall outside ``[0, W) x [0, H)`` to white (in place)."""
    lx0, ly0 = origin
    lw, lh = level_size
    h, w = arr.shape[:2]
    x_lo, x_hi = max(0, -lx0), max(0, min(w, lw - lx0))
    y_lo, y_hi = max(0, -ly0), max(0, min(h, lh - ly0))
    if x_lo >= x_hi or y_lo >= y_hi:
        arr[...] = _WHITE
        return arr
    arr[:y_lo] = _WHITE
    arr[y_hi:] = _WHITE
    arr[:, :x_lo] = _WHITE
    arr[:, x_hi:] = _WHITE
    return arr


def region_overlaps(
    origin: tuple[int, int], size: tuple[int, int], level_size: tuple[int, int]
) -> bool:
    """Whether a level-coordinate rectangle intersects the level."""
    (lx0, ly0), (w, h), (lw, lh) = origin, size, level_size
    return lx0 < lw and ly0 < lh and lx0 + w > 0 and ly0 + h > 0


def white(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return np.full((h, w, 3), _WHITE, dtype=np.uint8)


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


# --------------------------------------------------------------------------- mpp helpers


def check_mpp_override(value: float, what: str = "mpp override") -> float:
    """Validate a user-given mpp: a finite number within :data:`MPP_MIN`..:data:`MPP_MAX`."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}")
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}") from None
    if not (math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX):
        raise InvalidArgumentError(
            f"{what} {value} um/px is outside the plausible range {MPP_MIN:g}-{MPP_MAX:g}"
        )
    return mpp


def resolve_mpp(reader: SlideReader, override: float | None) -> float:
    """The microns per pixel to use for ``reader``'s level 0.

    Returns ``override`` if given (validated: 0.05-20 um/px, else InvalidArgumentError),
    else ``reader.mpp`` (the ``open_slide(mpp=)`` override or the file's value) if it is
    plausible (0.05 <= mpp <= 20).

    Raises:
        MissingMppError: the slide has no mpp metadata, or an implausible value (e.g. a TIFF
            whose resolution tags say 72 dpi); the message tells to pass ``--slide-mpp``.
    """
    if override is not None:
        return check_mpp_override(override)
    mpp = reader.mpp
    if mpp is None:
        raise MissingMppError(
            f"{reader.path}: slide has no microns-per-pixel metadata; pass --slide-mpp"
        )
    if not (MPP_MIN <= mpp <= MPP_MAX):
        raise MissingMppError(
            f"{reader.path}: slide reports implausible mpp {mpp:.4g} um/px "
            f"(expected {MPP_MIN:g}-{MPP_MAX:g}); pass --slide-mpp"
        )
    return mpp


def _path_keys(slide: str, base: Path) -> list[str]:
    """Keys under which a CSV slide entry is stored: full path (for entries with a
    directory part, relative ones resolved against ``base``), text as written, name, stem.
    The first key is the entry's identity."""
    p = Path(slide).expanduser()
    keys = [str((base / p).resolve())] if p.is_absolute() or len(p.parts) > 1 else []
    keys += [slide, p.name, p.stem]
    return list(dict.fromkeys(k for k in keys if k))


def load_mpp_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read a per-slide mpp table: a CSV with header ``slide,mpp`` (extra columns ignored).

    ``slide`` may be a file name (``a.svs``), a stem (``a``) or a path (absolute, or relative
    to the CSV's directory). Every row is stored under its full path (for path entries), the
    text as written, the file name and the stem, so :func:`lookup_mpp` finds a slide by any
    of them; a stem or name shared by rows with different mpp is dropped as ambiguous.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: (an InvalidArgumentError) missing columns, empty slide, an mpp that is
            not a number in 0.05-20, or the same slide listed twice with different values.
            The message gives ``<csv>:<line>``.
    """
    csv_path = Path(path).expanduser()
    table: dict[str, float] = {}
    exact: dict[str, tuple[float, int]] = {}
    ambiguous: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        for row in reader:
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            header = [c.strip().lower() for c in row]
            break
        if header is None or "slide" not in header or "mpp" not in header:
            raise ConfigError(
                f"{csv_path}: expected a header with columns 'slide,mpp', got "
                f"{','.join(header) if header else 'an empty file'}"
            )
        i_slide, i_mpp = header.index("slide"), header.index("mpp")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            if len(row) <= max(i_slide, i_mpp):
                raise ConfigError(f"{csv_path}:{line}: expected columns slide,mpp, got {row!r}")
            slide, raw = row[i_slide].strip(), row[i_mpp].strip()
            if not slide:
                raise ConfigError(f"{csv_path}:{line}: empty slide name")
            try:
                mpp = check_mpp_override(float(raw), "mpp")
            except (ValueError, InvalidArgumentError):
                raise ConfigError(
                    f"{csv_path}:{line}: invalid mpp {raw!r} for slide {slide!r} "
                    f"(expected a number in {MPP_MIN:g}-{MPP_MAX:g} um/px)"
                ) from None
            keys = _path_keys(slide, csv_path.parent)
            primary, loose = keys[0], keys[1:]
            if primary in exact and exact[primary][0] != mpp:
                raise ConfigError(
                    f"{csv_path}:{line}: slide {slide!r} already listed on line "
                    f"{exact[primary][1]} with mpp {exact[primary][0]:g}"
                )
            exact[primary] = (mpp, line)
            table[primary] = mpp
            for key in loose:
                if key in ambiguous or key in exact:
                    continue
                if key in table and table[key] != mpp:
                    ambiguous.add(key)
                    del table[key]
                else:
                    table[key] = mpp
    return table


def lookup_mpp(table: dict[str, float], slide_path: str | os.PathLike[str]) -> float | None:
    """Find a slide's mpp in a :func:`load_mpp_csv` table by full path, name or stem."""
    p = Path(os.fspath(slide_path)).expanduser()
    for key in (str(p.resolve()), os.fspath(slide_path), p.name, p.stem):
        if key in table:
            return table[key]
    return None
