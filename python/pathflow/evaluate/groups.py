"""Which slide (or patient) each labelled image comes from, so that a split keeps every
slide's patches on one side (patches of one slide on both sides inflate every figure).

The group of an image, by ``--group-by``:

* ``slide``: the ``slide`` column of a ``--groups`` CSV (columns ``file`` and ``slide`` and/or
  ``patient``; ``file`` is the image's path under the data folder, its file name or its
  stem), else the ``slide`` field of a JSON file beside the image (``<stem>.json``, as in
  pathflow's shards), else pathflow's own patch file name ``<slide>_<x>_<y>.<ext>`` (the
  names of ``pathflow tile --shards`` samples and of the demo's labelled set);
* ``patient``: the ``patient`` column of the CSV (or field of the JSON);
* ``auto`` (default): by slide when every image's slide is known that way, else none;
* ``none``: no groups (a random stratified split).

Example:
    >>> slide_of_name("TUM/TCGA-AA-3512_10240_4096.jpg")
    'TCGA-AA-3512'
    >>> slide_of_name("TUM/img001.jpg") is None
    True
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pathflow.exceptions import ConfigError

log = logging.getLogger("pathflow.eval")

#: Values of ``--group-by``.
GROUP_BY = ("auto", "slide", "patient", "none")


@dataclass
class ImageGroups:
    """One group id per image (``values``), what it is (``key``: slide or patient) and where
    it was read (``source``)."""

    key: str
    source: str
    values: list[str]

    def count(self) -> int:
        return len(set(self.values))


def slide_of_name(name: str) -> str | None:
    """Slide id of pathflow's patch file naming ``<slide>_<x>_<y>.<ext>``, else ``None``."""
    stem = Path(name).name.rsplit(".", 1)[0]
    parts = stem.rsplit("_", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2].isdigit():
        return parts[0]
    return None


def read_groups_csv(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """``--groups`` CSV: file -> {"slide": ..., "patient": ...} (columns present only)."""
    p = Path(path)
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the groups file ({exc})") from exc
    if not rows:
        raise ConfigError(f"{p}: empty groups file (expected columns file,slide and/or patient)")
    if "file" not in columns or not {"slide", "patient"} & set(columns):
        raise ConfigError(f"{p}: expected columns file and slide and/or patient, got "
                          f"{', '.join(columns)}")  # fmt: skip
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if row.get("file"):
            out[row["file"]] = {k: row[k] for k in ("slide", "patient") if row.get(k)}
    return out


def _sidecar(root: Path, name: str) -> dict[str, str]:
    path = (root / name).with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: str(meta[k]) for k in ("slide", "patient") if meta.get(k) not in (None, "")}


def image_groups(
    root: str | os.PathLike[str],
    names: list[str],
    group_by: str = "auto",
    groups_csv: str | None = None,
    warn: bool = True,
) -> ImageGroups | None:
    """Groups of the images ``names`` (paths relative to ``root``), see the module docstring;
    ``None`` for ``none``, and for ``auto`` when some image's slide is unknown (a warning
    naming one unless not ``warn``). ``slide``/``patient`` with an unknown group is a
    :class:`ConfigError`."""
    if group_by not in GROUP_BY:
        raise ConfigError(f"--group-by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if group_by == "none":
        return None
    key = "patient" if group_by == "patient" else "slide"
    table = read_groups_csv(groups_csv) if groups_csv else {}
    r = Path(root)
    values: list[str] = []
    sources: set[str] = set()
    for name in names:
        p = Path(name)
        row = table.get(name) or table.get(p.name) or table.get(p.stem) or {}
        if key in row:
            values.append(row[key])
            sources.add(f"{groups_csv}")
            continue
        meta = _sidecar(r, name)
        if key in meta:
            values.append(meta[key])
            sources.add("JSON beside the images")
            continue
        slide = slide_of_name(name) if key == "slide" else None
        if slide is not None:
            values.append(slide)
            sources.add("file names <slide>_<x>_<y>")
            continue
        why = (
            f"{r / name}: no {key} id (not in {groups_csv or 'a --groups CSV'}, no "
            f"<stem>.json with a {key!r} field"
            + (", name not <slide>_<x>_<y>)" if key == "slide" else ")")
        )
        if group_by == "auto":
            if warn:
                log.warning("%s: random split, patches of one slide may be on both sides "
                            "(give --groups CSV, or --group-by none)", why)  # fmt: skip
            return None
        raise ConfigError(why)
    return ImageGroups(key, " + ".join(sorted(sources)), values)
