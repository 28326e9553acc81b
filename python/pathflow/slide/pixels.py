"""Pixel helpers shared by the readers: RGB ``uint8`` coercion, compositing onto white, and
regions that reach past the slide's edge (white there, as OpenSlide renders them).

Example:
    >>> import numpy as np
    >>> rgba = np.array([[[200, 10, 10, 255], [0, 0, 0, 0], [0, 0, 0, 128]]], np.uint8)
    >>> composite_on_white(rgba).tolist()
    [[[200, 10, 10], [255, 255, 255], [127, 127, 127]]]
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "composite_on_white",
    "level_origin",
    "region_overlaps",
    "to_rgb_uint8",
    "white",
    "whiten_outside",
]

_WHITE = 255


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
