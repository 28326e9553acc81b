"""Microns per pixel: the plausible range, metadata values, overrides and per-slide CSV tables.

Example:
    >>> from pathflow.slide.mpp import check_mpp_override, mean_mpp
    >>> mean_mpp("0.2525", 0.2475), mean_mpp(None, "0.5"), mean_mpp("n/a", 0)
    (0.25, 0.5, None)
    >>> check_mpp_override(0.5)
    0.5
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathflow.exceptions import ConfigError, InvalidArgumentError, MissingMppError

if TYPE_CHECKING:
    from pathflow.slide.base import SlideReader

__all__ = [
    "MPP_MAX",
    "MPP_MIN",
    "check_mpp_override",
    "load_mpp_csv",
    "lookup_mpp",
    "mean_mpp",
    "resolve_mpp",
]

#: Plausible microns-per-pixel range for a scanned slide (level 0), inclusive.
MPP_MIN = 0.05
MPP_MAX = 20.0


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
