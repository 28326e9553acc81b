"""What to embed: patches grouped into one output file each (a slide, or a folder of images).

* WebDataset shards of ``pathflow tile --shards`` (a folder with ``shards.json`` and
  ``*.tar``, or the tile output folder holding ``shards/``): samples are located through the
  DALI index next to each shard (``v1.2 N`` header, then ``ext offset size name`` groups per
  sample; a tar scan when there is none), grouped by slide, coordinates from the key
  ``<slide key>_<x>_<y>`` (the sample's JSON when the key does not tell).
* Coordinate files + slides (a tile output folder without ``shards/``, its ``coords/``,
  CLAM's ``patches/*.h5``): patches read from the slides and encoded as the tiler does
  (:mod:`pathflow.extract.slide_regions`).
* ImageFolder-style folders: ``root/<group>/<image>.{jpg,png,tif,...}`` gives one group per
  sub-folder (images directly in ``root`` form a group named after ``root``); coordinates
  are parsed from names ending in ``<x>_<y>`` (else -1).

Example:
    >>> from pathflow.extract.sources import discover
    >>> kind, groups = discover("pathflow_out/shards")  # doctest: +SKIP
    >>> kind, groups[0].name, len(groups[0])  # doctest: +SKIP
    ('shards', 'cmu_small_region', 43)
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathflow.exceptions import ConfigError
from pathflow.extract.slide_regions import SlideReadOptions, coords_groups, is_coords_folder
from pathflow.extract.types import PatchGroup, PatchRef, RegionGroup, SourceError

#: ``kind`` of coordinate-file inputs (:func:`discover`).
COORDS_KIND = "coordinates + slides"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_XY = re.compile(r"(\d+)[_-](\d+)$")


class ByteReader:
    """Positional reads with a small cache of open file descriptors (thread-safe)."""

    def __init__(self, max_open: int = 64) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_open

    def read(self, ref: PatchRef) -> bytes:
        if ref.data is not None:
            return ref.data
        if ref.error is not None:
            raise OSError(ref.error)
        if ref.size < 0:
            return Path(ref.path).read_bytes()
        fd = self._fd(ref.path)
        data = os.pread(fd, ref.size, ref.offset)
        if len(data) != ref.size:
            raise SourceError(f"{ref.path}: truncated at byte {ref.offset + len(data)}")
        return data

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                return fd
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            while len(self._fds) > self._max:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> ByteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover(
    path: str | os.PathLike[str],
    read: SlideReadOptions | None = None,
    keep: Callable[[str], bool] | None = None,
) -> tuple[str, list[PatchGroup]]:
    """``(kind, groups)`` of a shards folder (or a tile output folder holding ``shards/``),
    coordinate files + slides (a tile output folder without shards, its ``coords/``, CLAM's
    ``patches/``; read as ``read`` says) or an image folder. ``keep(slide id)`` selects the
    coordinate files to open (``--part``; other inputs are filtered by the caller)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".h5" and is_coords_folder(p):
        return COORDS_KIND, coords_groups(p, read, 0, keep)
    if not p.is_dir():
        raise ConfigError(
            f"{p}: not a folder (expected shards, coordinate files or an image folder)"
        )
    if (p / "shards.json").is_file() or any(p.glob("*.tar")):
        return "shards", shard_groups(p)
    if (p / "shards" / "shards.json").is_file():
        return "shards", shard_groups(p / "shards")
    if is_coords_folder(p):
        return COORDS_KIND, coords_groups(p, read, 0, keep)
    return "images", image_folder_groups(p)


# --------------------------------------------------------------------------------------- shards
@dataclass
class _Sample:
    key: str
    image: tuple[int, int]
    meta: tuple[int, int] | None
    #: ``(offset, size)`` of the region sub-patches ``p000.<ext>``... in row-major order
    subs: list[tuple[int, int]] = field(default_factory=list)


_SUB = re.compile(r"p(\d+)\.(\w+)$")


def _subs(comps: dict[str, tuple[int, int]], image_ext: str) -> list[tuple[int, int]]:
    found = sorted(
        (int(m.group(1)), v)
        for k, v in comps.items()
        if (m := _SUB.match(k)) is not None and m.group(2) == image_ext
    )
    return [v for _, v in found]


def read_index(tar: Path, image_ext: str) -> list[_Sample]:
    """Samples of one shard from its DALI ``.idx`` (or a tar scan when it is missing)."""
    idx = tar.with_suffix(".idx")
    return _read_idx(idx, image_ext) if idx.is_file() else _scan_tar(tar, image_ext)


def _read_idx(idx: Path, image_ext: str) -> list[_Sample]:
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise SourceError(f"{idx}: not a DALI index (no 'v1.2 N' header)")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        tok = line.split()
        if not tok:
            continue
        if len(tok) % 4:
            raise SourceError(f"{idx}: line {n} is not 'ext offset size name' groups")
        comps = {
            tok[i]: (int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)
        }
        if image_ext not in comps:
            raise SourceError(f"{idx}: line {n} has no .{image_ext} image")
        off, size, name = comps[image_ext]
        meta = comps.get("json")
        key = name[: -len(image_ext) - 1] if name.endswith("." + image_ext) else name
        subs = _subs({k: (v[0], v[1]) for k, v in comps.items()}, image_ext)
        out.append(_Sample(key, (off, size), (meta[0], meta[1]) if meta else None, subs))
    return out


def _scan_tar(tar: Path, image_ext: str) -> list[_Sample]:
    try:
        with tarfile.open(tar, "r:") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{tar}: unreadable shard ({exc})") from exc
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for m in members:
        base = m.name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        key = m.name[: len(m.name) - len(base)] + stem
        samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return [
        _Sample(k, c[image_ext], c.get("json"), _subs(c, image_ext))
        for k, c in samples.items()
        if image_ext in c
    ]


def _shard_listing(sdir: Path) -> tuple[list[Path], str, dict[str, Any]]:
    """The shards of ``sdir`` (as ``shards.json`` lists them, else ``*.tar``), their image
    extension and the ``shards.json`` summary (empty without one)."""
    summary: dict[str, Any] = {}
    if (sdir / "shards.json").is_file():
        try:
            summary = json.loads((sdir / "shards.json").read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{sdir / 'shards.json'}: unreadable ({exc})") from exc
        tars = [sdir / s["name"] for s in summary.get("shards", [])]
    else:
        tars = sorted(sdir.glob("*.tar"))
    if not tars:
        raise SourceError(f"{sdir}: no shards listed in shards.json and no *.tar files")
    return tars, str(summary.get("image_ext", "jpg")), summary


def shard_groups(sdir: Path) -> list[PatchGroup]:
    """Patches of every shard in ``sdir`` grouped by slide (slides sorted, shard order kept)."""
    from pathflow import _core

    tars, image_ext, summary = _shard_listing(sdir)
    slides = dict(summary.get("slides", {}))
    by_key = {_core.sanitize_key(str(s), 60): str(s) for s in slides}
    rows: dict[str, list[tuple[PatchRef, int, int]]] = {}
    first_meta: dict[str, dict[str, Any]] = {}
    with ByteReader() as reader:
        for tar in tars:
            if not tar.is_file():
                raise SourceError(f"{tar}: shard listed in shards.json is missing")
            path = str(tar)
            for s in read_index(tar, image_ext):
                slide, x, y = _slide_xy(s.key, by_key)
                meta: dict[str, Any] | None = None
                if (slide is None or slide not in first_meta) and s.meta is not None:
                    meta = _read_json(reader, PatchRef(path, *s.meta))
                    if slide is None:
                        slide = str(meta.get("slide", tar.stem))
                        x, y = int(meta.get("x", -1)), int(meta.get("y", -1))
                if slide is None:
                    slide = tar.stem
                if slide not in first_meta:
                    first_meta[slide] = meta or {}
                rows.setdefault(slide, []).append((PatchRef(path, *s.image), x, y))
    groups = []
    for slide in sorted(rows):
        r = rows[slide]
        expected = slides.get(slide)
        if expected is not None and int(expected) != len(r):
            raise SourceError(
                f"{sdir / 'shards.json'}: lists {expected} samples of {slide}, shards hold {len(r)}"
            )
        groups.append(
            PatchGroup(
                name=slide,
                refs=[t[0] for t in r],
                coords=np.array([(t[1], t[2]) for t in r], np.int64).reshape(-1, 2),
                attrs=_patch_attrs(first_meta[slide]),
            )
        )
    return groups


def _slide_xy(key: str, by_key: dict[str, str]) -> tuple[str | None, int, int]:
    parts = key.rsplit("/", 1)[-1].rsplit("_", 2)
    if len(parts) == 3 and parts[0] in by_key and parts[1].isdigit() and parts[2].isdigit():
        return by_key[parts[0]], int(parts[1]), int(parts[2])
    return None, -1, -1


def _read_json(reader: ByteReader, ref: PatchRef) -> dict[str, Any]:
    try:
        data = json.loads(reader.read(ref))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{ref.path}: bad sample JSON at byte {ref.offset} ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _patch_attrs(meta: dict[str, Any]) -> dict[str, Any]:
    """Patch geometry of a slide for the features file (CLAM names where they exist)."""
    out: dict[str, Any] = {}
    names = {
        "patch_size": "patch_size",
        "patch_size_level0": "patch_size_level0",
        "level": "patch_level",
        "read_size": "read_size",
        "mpp": "target_mpp",
        "slide_mpp": "mpp",
    }
    for src, dst in names.items():
        if src in meta and isinstance(meta[src], (int, float)):
            out[dst] = meta[src]
    return out


# --------------------------------------------------------------------------------- image folders
def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted by name, hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def image_folder_groups(root: Path) -> list[PatchGroup]:
    """One group per sub-folder with images (plus ``root`` itself when it holds images)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    folders = [root, *subdirs]
    groups = []
    for d in folders:
        files = list_images(d)
        if not files:
            continue
        coords = np.full((len(files), 2), -1, np.int64)
        for i, f in enumerate(files):
            m = _XY.search(f.stem)
            if m:
                coords[i] = (int(m.group(1)), int(m.group(2)))
        groups.append(
            PatchGroup(
                name=d.name if d != root else root.resolve().name,
                refs=[PatchRef(str(f)) for f in files],
                coords=coords,
                names=[str(f.relative_to(root)) for f in files],
            )
        )
    if not groups:
        raise SourceError(
            f"{root}: no images found (expected ROOT/<group>/<image>.jpg|png|tif or shards)"
        )
    return groups


# ------------------------------------------------------------------------------------- regions
def region_shard_groups(sdir: Path) -> list[RegionGroup]:
    """Regions of ``pathflow tile --shards --region R --region-patches`` shards, grouped by
    slide: each sample's ``p000.<ext>``... sub-patches (refs into the tars), region
    coordinates from the key (or the sample's JSON)."""
    from pathflow import _core

    tars, image_ext, summary = _shard_listing(sdir)
    by_key = {_core.sanitize_key(str(s), 60): str(s) for s in summary.get("slides", {})}
    rows: dict[str, list[tuple[list[PatchRef], int, int]]] = {}
    first_meta: dict[str, dict[str, Any]] = {}
    n_sub: int | None = None
    with ByteReader() as reader:
        for tar in tars:
            if not tar.is_file():
                raise SourceError(f"{tar}: shard listed in shards.json is missing")
            path = str(tar)
            for s in read_index(tar, image_ext):
                if not s.subs:
                    raise SourceError(
                        f"{tar}: sample {s.key} holds no region sub-patches (p000.{image_ext}...)"
                        "; tile with --region SIZE --region-patches"
                    )
                if n_sub is None:
                    n_sub = len(s.subs)
                elif len(s.subs) != n_sub:
                    raise SourceError(
                        f"{tar}: sample {s.key} has {len(s.subs)} sub-patches, others {n_sub}"
                    )
                slide, x, y = _slide_xy(s.key, by_key)
                if (slide is None or slide not in first_meta) and s.meta is not None:
                    meta = _read_json(reader, PatchRef(path, *s.meta))
                    if slide is None:
                        slide = str(meta.get("slide", tar.stem))
                        x, y = int(meta.get("x", -1)), int(meta.get("y", -1))
                    first_meta.setdefault(slide, meta)
                if slide is None:
                    slide = tar.stem
                first_meta.setdefault(slide, {})
                refs = [PatchRef(path, off, size) for off, size in s.subs]
                rows.setdefault(slide, []).append((refs, x, y))
    assert n_sub is not None
    grid = math.isqrt(n_sub)
    if grid * grid != n_sub:
        raise SourceError(f"{sdir}: regions hold {n_sub} sub-patches, not a square grid")
    groups = []
    for slide in sorted(rows):
        r = rows[slide]
        meta = first_meta[slide]
        attrs = _patch_attrs(meta)
        attrs.update(_region_attrs(meta, grid))
        groups.append(
            RegionGroup(
                name=slide,
                refs=[ref for t in r for ref in t[0]],
                coords=np.array([(t[1], t[2]) for t in r], np.int64).reshape(-1, 2),
                attrs=attrs,
                grid=grid,
            )
        )
    return groups


def _region_attrs(meta: dict[str, Any], grid: int) -> dict[str, Any]:
    """Region geometry for the region features file."""
    out: dict[str, Any] = {"grid": grid}
    if isinstance(meta.get("patch_size"), (int, float)):
        out["region_size"] = int(meta["patch_size"])
    if isinstance(meta.get("sub_patch_size"), (int, float)):
        out["region_patch_size"] = int(meta["sub_patch_size"])
    elif "region_size" in out:
        out["region_patch_size"] = out["region_size"] // grid
    return out


def discover_regions(
    path: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    region_patch: int = 256,
    read: SlideReadOptions | None = None,
    keep: Callable[[str], bool] | None = None,
) -> tuple[str, list[RegionGroup]]:
    """``(kind, groups)``: region groups of region shards (a shards folder or the tile output
    folder holding ``shards/``), else of region coordinate files + slides
    (:mod:`pathflow.extract.slide_regions`; ``read`` replaces ``slides``, ``keep`` as for
    :func:`discover`)."""
    p = Path(path)
    if p.is_dir() and ((p / "shards.json").is_file() or any(p.glob("*.tar"))):
        return "region shards", region_shard_groups(p)
    if p.is_dir() and (p / "shards" / "shards.json").is_file():
        return "region shards", region_shard_groups(p / "shards")
    if p.exists() and is_coords_folder(p):
        opts = read or SlideReadOptions(slides=str(slides) if slides else None)
        groups = coords_groups(p, opts, region_patch, keep)
        return COORDS_KIND, [g for g in groups if isinstance(g, RegionGroup)]
    raise ConfigError(
        f"{p}: no region shards or coordinate files (run pathflow tile --region 4096 "
        "[--shards --region-patches])"
    )
