"""Per-part manifests of a job folder: one JSON line appended per finished slide.

``manifests/part-IIII-of-NNNN.jsonl`` grows by one line per slide as the part works (written
with one ``write`` on an ``O_APPEND`` descriptor, then fsync), so a manifest costs O(1) per
slide instead of rewriting a CSV of every slide so far. A job killed mid-write leaves at most
a torn last line, which readers skip (a later append starts on a fresh line). A re-run appends
again; the last line of a slide wins (``stage`` says which phase wrote it: ``tile`` when the
slide finished, ``shards`` for its final row after the shards phase). When a part has
finished, ``part-IIII-of-NNNN.done`` (written atomically) lists its slides, so
``pathflow merge`` knows the part is complete.

Example:
    >>> import tempfile, pathlib
    >>> job = pathlib.Path(tempfile.mkdtemp())
    >>> with ManifestLog(manifest_path(job, (0, 2))) as log:
    ...     log.append({"slide": "a", "status": "ok", "patches": 3})
    >>> rows, bad = read_manifest(manifest_path(job, (0, 2)))
    >>> rows[0]["patches"], bad
    (3, 0)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pathflow.jobs.partition import format_part

__all__ = [
    "MANIFEST_FIELDS",
    "ManifestLog",
    "done_path",
    "latest_rows",
    "list_parts",
    "manifest_path",
    "read_done",
    "read_manifest",
    "write_done",
    "write_manifest_csv",
]

#: Columns of a job's ``manifest.csv``, one row per slide (the rows ``pathflow tile`` writes;
#: ``pathflow.tiling.slide_task`` re-exports it).
MANIFEST_FIELDS = [
    "slide", "path", "status", "patches", "mpp", "mpp_source", "target_mpp", "patch_level",
    "patch_size", "patch_size_level0", "seg_level", "tissue_mm2", "seconds", "resumed",
    "shard_samples", "error",
]  # fmt: skip

_NAME_RE = re.compile(r"^part-(\d{4,})-of-(\d{4,})\.(jsonl|done)$")


def manifest_path(job: str | os.PathLike[str], part: tuple[int, int]) -> Path:
    """``JOB/manifests/part-IIII-of-NNNN.jsonl``."""
    return Path(job) / "manifests" / f"{format_part(part)}.jsonl"


def done_path(job: str | os.PathLike[str], part: tuple[int, int]) -> Path:
    """``JOB/manifests/part-IIII-of-NNNN.done``: present once the part has finished."""
    return Path(job) / "manifests" / f"{format_part(part)}.done"


def _plain(v: Any) -> Any:
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        return item()
    return str(v)


class ManifestLog:
    """Append-only JSONL manifest (one ``os.write`` + fsync per row)."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        size = os.fstat(self._fd).st_size
        if size:  # a torn last line (killed writer) must not swallow our first row
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=_plain, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ManifestLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """All rows of a JSONL manifest in file order and the number of unreadable (torn)
    lines skipped; a missing file has no rows."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(doc, dict) and "slide" in doc:
            rows.append(doc)
        else:
            bad += 1
    return rows, bad


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Slide id -> its last row (a re-run's row replaces the earlier one)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.pop(str(r["slide"]), None)
        out[str(r["slide"])] = r
    return out


def write_done(job: str | os.PathLike[str], part: tuple[int, int], info: dict[str, Any]) -> None:
    """Mark ``part`` finished (atomically); ``info`` holds at least ``slides``."""
    from pathflow.outputs import atomic_write_text

    atomic_write_text(done_path(job, part), json.dumps(info, default=_plain, indent=1) + "\n")


def read_done(job: str | os.PathLike[str], part: tuple[int, int]) -> dict[str, Any] | None:
    """The ``.done`` record of a part, or None when the part has not finished."""
    try:
        doc = json.loads(done_path(job, part).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        from pathflow.exceptions import PathflowError

        raise PathflowError(f"{done_path(job, part)}: unreadable ({exc})") from exc
    return doc if isinstance(doc, dict) else None


def list_parts(job: str | os.PathLike[str]) -> dict[int, set[int]]:
    """Part count N -> indices with a manifest or done file in ``JOB/manifests``."""
    found: dict[int, set[int]] = {}
    d = Path(job) / "manifests"
    if not d.is_dir():
        return found
    for f in d.iterdir():
        m = _NAME_RE.match(f.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return found


def write_manifest_csv(
    path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], fields: Sequence[str]
) -> None:
    """``manifest.csv`` (atomic): one row per slide, columns ``fields``."""
    from pathflow.outputs import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
