"""Decode encoded patches to fixed-size RGB arrays for a backbone.

JPEG, PNG and WebP go through the Rust core (``pathflow._core.decode_views``: libjpeg-turbo
decode, antialiased bilinear resize of the whole image to ``S x S`` as PIL's, up to rounding, no
GIL); other formats (the TIFF patches of NCT-CRC-HE-100K, BMP) and whatever the Rust decoder
refuses go through PIL with the same filter. Images neither can decode come back as zeros
with ``ok=False`` and a reason.

Example:
    >>> from pathflow.extract.decode import decode_resize
    >>> batch = decode_resize([open("patch.jpg", "rb").read()], 224)  # doctest: +SKIP
    >>> batch.images.shape, batch.ok.tolist()  # doctest: +SKIP
    ((1, 224, 224, 3), [True])
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pathflow.exceptions import PathflowError

_NOT_FAST = "not a JPEG, PNG or WebP"


@dataclass
class DecodedBatch:
    """``images`` (N, S, S, 3) uint8, ``ok`` (N,) bool, ``reasons`` (None where ok)."""

    images: npt.NDArray[np.uint8]
    ok: npt.NDArray[np.bool_]
    reasons: list[str | None]


def decode_resize(data: list[bytes], size: int) -> DecodedBatch:
    """Decode every image and resize it (whole, aspect not kept) to ``size x size``."""
    from pathflow import _core

    if not hasattr(_core, "decode_views"):
        raise PathflowError(
            "pathflow._core lacks decode_views: rebuild the extension (pip install -e .)"
        )
    n = len(data)
    images = np.zeros((n, size, size, 3), np.uint8)
    ok = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    dims, probe = _core.image_info(data)
    fast = [i for i in range(n) if probe[i] is None]
    if fast:
        boxes = np.zeros((len(fast), 1, 4), np.float32)
        boxes[:, 0, 2:] = np.asarray(dims, np.float32)[fast]
        d4 = np.zeros((len(fast), 1), np.uint8)
        views, fast_ok, fast_reasons = _core.decode_views(
            [data[i] for i in fast], [boxes], [size], [d4]
        )
        images[fast] = views[0][:, 0]
        ok[fast] = np.asarray(fast_ok, bool)
        for j, i in enumerate(fast):
            reasons[i] = fast_reasons[j]
    for i in np.flatnonzero(~ok).tolist():
        # TIFF/BMP, and JPEG/PNG/WebP variants the Rust decoder refuses (16-bit PNG...):
        # PIL; the Rust reason is kept when PIL cannot decode either.
        img, why = pil_decode_resize(data[i], size)
        if img is not None:
            images[i], ok[i], reasons[i] = img, True, None
        else:
            reasons[i] = why if probe[i] == _NOT_FAST else (reasons[i] or probe[i])
    return DecodedBatch(images=images, ok=ok, reasons=reasons)


def pil_decode_resize(data: bytes, size: int) -> tuple[npt.NDArray[np.uint8] | None, str | None]:
    """PIL decode -> RGB -> antialiased bilinear resize; ``(None, reason)`` on failure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, np.uint8), None
    except UnidentifiedImageError:
        return None, "not a recognised image (JPEG, PNG, TIFF, BMP, WebP)"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
