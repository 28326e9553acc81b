"""Slide inputs: files and folders expanded into slide paths (each file once), and slide ids.

Shared by ``pathflow tile`` (:mod:`pathflow.tiling.runner`, which re-exports these names) and
``pathflow status`` (:mod:`pathflow.jobs.status`, the slides a job folder's inputs hold), so
neither imports the other.

Example:
    >>> from pathlib import Path
    >>> slide_id(Path("a/TCGA-01.ome.tiff")), slide_id(Path("b/case.1.svs"))
    ('TCGA-01', 'case.1')
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SLIDE_EXTENSIONS", "discover", "discover_inputs", "no_slides_message", "slide_id"]

SLIDE_EXTENSIONS = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".svslide", ".bif",
    ".jpg", ".jpeg", ".png", ".bmp",
)  # fmt: skip


def slide_id(path: Path) -> str:
    """Slide identifier: the file name without its extension (dots inside are kept)."""
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def discover_inputs(
    inputs: Iterable[str | os.PathLike[str]], recursive: bool = False
) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Expand files and folders into slide paths (folders: known extensions, sorted) and
    the duplicates dropped: (kept path, dropped path) pairs naming one file twice (a symlink,
    a hard link, ``./a.svs`` and ``a.svs``...). The first path is kept, or the real file
    rather than a symlink to it (its name is the slide id).

    Paths that do not exist are kept, so they are reported as failed slides.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            out.extend(
                sorted(q for q in it if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS)
            )
        else:
            out.append(p)
    seen: dict[Any, Path] = {}
    unique: list[Path] = []
    dups: list[tuple[Path, Path]] = []
    for p in out:
        try:
            st = p.stat()
            key: Any = (st.st_dev, st.st_ino)
        except OSError:
            key = os.path.abspath(p)
        if key in seen:
            first = seen[key]
            if first.is_symlink() and not p.is_symlink():  # keep the real file's name
                unique[unique.index(first)] = seen[key] = p
                p, first = first, p
            dups.append((first, p))
            continue
        seen[key] = p
        unique.append(p)
    return unique, dups


def discover(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand files and folders into slide paths, each file once (see
    :func:`discover_inputs`, which also returns the duplicates)."""
    return discover_inputs(inputs, recursive)[0]


def no_slides_message(inputs: Iterable[str | os.PathLike[str]], recursive: bool) -> str:
    """One line for a run that found no slide: which folders were searched and, when their
    slides may sit in sub-folders, the hint to pass ``--recursive``."""
    dirs = [Path(p) for p in inputs if Path(p).is_dir()]
    if not dirs:
        return "no slides given (paths, folders or --sample NAME)"
    parts = []
    for d in dirs:
        subs = sum(1 for q in d.iterdir() if q.is_dir())
        hint = f" ({subs} sub-folder{'s' if subs != 1 else ''}; use --recursive)"
        parts.append(f"{d}{hint if subs and not recursive else ''}")
    return f"no slides found in {', '.join(parts)}"
