"""What a file is, from its first bytes, and what is wrong with a TIFF that will not open.

Example:
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".svs") as f:
    ...     _ = f.write(b"II*\\x00" + (4096).to_bytes(4, "little"))
    ...     f.flush()
    ...     print(sniff_format(f.name))
    ...     print(tiff_header_problem(f.name).split(";")[0])
    tiff
    first TIFF directory at byte 4096 is beyond the end of the file (8 bytes)
"""

from __future__ import annotations

import os
import struct
from typing import Any

from pathflow.slide.mpp import mean_mpp

__all__ = ["sniff_format", "tiff_header_problem", "tiff_resolution_mpp"]


def _one_line(text: object) -> str:
    """Collapse a (library) message onto one line."""
    out = " ".join(str(text).split())
    return out or "unknown error"


def _exc_text(exc: BaseException) -> str:
    msg = _one_line(exc) if str(exc).strip() else ""
    return msg or type(exc).__name__


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
