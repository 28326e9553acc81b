"""Phase 2 of ``pathflow tile --shards``: patch pixels into WebDataset shards.

The samples of a run are a fixed sequence: slides in id order, each slide's coordinates in
file order, or, with ``--shuffle``, a seeded permutation of all of them so a streaming
loader sees many slides per batch. The sequence is cut into shards by the Rust writer
(``max samples`` / ``max bytes``), so a shard's content depends only on where it starts.

Resuming: finished shards (``<prefix>-%06d.tar`` + ``.idx``, published atomically) are kept,
their sample counts give the position to continue from, and the rest is rewritten; a run
killed at any moment and re-run yields exactly the shards of an uninterrupted run. A
``plan.json`` fingerprint guards against resuming with different options (an error); when
only the slides changed (added, or tiled again) every shard is written again.

Each sample: ``<key>.jpg`` (or ``.png``/``.webp``) and ``<key>.json`` (slide id, level-0
``x``/``y``, level read, mpp, sizes, tissue fraction); keys are dot-free
(``<slide key>_<x>_<y>``, the real slide id is in the JSON). In region mode the sample also
holds ``p000.jpg``... its grid of sub-patches, with their coordinates in the JSON.

Multi-magnification samples (``ShardParams.mpps``, ``pathflow tile --shards --shard-mpps
0.5,1,2``): the grid is laid at the first (finest) mpp and each sample keeps its usual
``<key>.jpg``; every coarser mpp ``m`` adds ``<key>.mpp<m:g>.jpg`` (``mpp1.jpg``,
``mpp2.jpg``, ``mpp0.25.jpg``...), the same pixel size, centred on the same level-0 point.
Each coarser entry is exactly what a single-resolution run at ``m`` writes for the level-0
top-left corner ``x + (S0 - Sm) // 2`` (``S`` the level-0 footprint ``round(patch * m /
slide mpp)``): read from the coarsest level at least as fine as ``m``, resampled and encoded
the same way, white past the slide edge (as OpenSlide composites). The JSON gains ``mpps``,
``scale_exts`` (the entry names, finest first), ``scale_levels`` and ``scale_boxes``
(level-0 ``[x, y, side]`` of each entry).

Example:
    >>> params = ShardParams(mpps=[0.5, 1.0, 2.0])
    >>> scale_exts(params)
    ['jpg', 'mpp1.jpg', 'mpp2.jpg']
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow import _core
from pathflow.choices import IMAGE_FORMATS, TRANSCODE_MODES, one_of
from pathflow.exceptions import InvalidArgumentError, PathflowError

CHUNK = 512


@dataclass
class ShardParams:
    prefix: str = "shard"
    max_samples: int = 10_000
    max_mb: float = 1024.0
    format: str = "jpg"
    quality: int = 90
    transcode: str = "auto"
    shuffle: bool = False
    seed: int = 0
    sub_size: int = 0
    backend: str = "auto"
    threads: int = 0
    mpps: list[float] = field(default_factory=list)  # > 1 entry: multi-magnification samples

    @property
    def multiscale(self) -> bool:
        return len(self.mpps) > 1

    def validate(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise InvalidArgumentError(
                f"format must be {one_of(IMAGE_FORMATS)}, got {self.format!r}"
            )
        if not 1 <= self.quality <= 100:
            raise InvalidArgumentError(f"quality must be in 1..100, got {self.quality}")
        if self.transcode not in TRANSCODE_MODES:
            raise InvalidArgumentError(f"transcode must be {one_of(TRANSCODE_MODES)}")
        if self.max_samples < 1 or self.max_mb <= 0:
            raise InvalidArgumentError("shard limits must be positive")
        if self.mpps:
            if any(not 0.05 <= m <= 100 for m in self.mpps):
                raise InvalidArgumentError(f"shard mpps must be in 0.05..100, got {self.mpps}")
            if any(b <= a for a, b in zip(self.mpps, self.mpps[1:], strict=False)):
                raise InvalidArgumentError(
                    f"shard mpps must be strictly increasing (finest first), got {self.mpps}"
                )
            if len({f"{m:g}" for m in self.mpps}) != len(self.mpps):
                raise InvalidArgumentError(f"shard mpps {self.mpps} give duplicate names")
            if self.multiscale and self.sub_size:
                raise InvalidArgumentError("multi-magnification samples need patches, not regions")


def scale_exts(params: ShardParams) -> list[str]:
    """Entry names of a sample's resolutions, finest first: the usual image extension, then
    ``mpp<m:g>.<format>`` for each coarser mpp (the key stays dot-free)."""
    return [params.format] + [f"mpp{m:g}.{params.format}" for m in params.mpps[1:]]


@dataclass
class Scale:
    """How one coarser resolution of a slide is read: pyramid level, side there, level-0
    footprint and the shift of its top-left corner from the finest patch's."""

    mpp: float
    level: int
    read_size: int
    size0: int
    shift0: int


def plan_scales(reader: Any, attrs: dict[str, Any], mpps: list[float]) -> list[Scale]:
    """The coarser resolutions of one slide, chosen as :func:`pathflow.grid.patch_grid`
    chooses the single one (level: coarsest with downsample <= 1.01 x the wanted one)."""
    from pathflow.grid import plan_read

    slide_mpp = float(attrs["mpp"])
    out = int(attrs.get("target_patch_size", attrs["patch_size"]))
    size0_fine = int(attrs.get("patch_size_level0", attrs["patch_size"]))
    scales = []
    for m in mpps[1:]:
        ratio = m / slide_mpp
        size0 = max(1, round(out * ratio))
        level = plan_read(reader, ratio)
        read_size = max(1, round(size0 / reader.level_downsamples[level]))
        scales.append(Scale(m, level, read_size, size0, (size0_fine - size0) // 2))
    return scales


@dataclass
class SlidePlan:
    sid: str
    path: Path
    coords: npt.NDArray[np.int64]
    fractions: npt.NDArray[np.float32]
    attrs: dict[str, Any]
    key: str = ""


@dataclass
class ShardReport:
    shards: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    resumed_shards: int = 0
    per_slide: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    passthrough_slides: int = 0

    def summary(self) -> str:
        mb = self.bytes / 1e6
        rate = self.samples / self.seconds if self.seconds else 0.0
        return (
            f"shards: {len(self.shards)} ({self.resumed_shards} resumed), {self.samples} samples, "
            f"{mb:.1f} MB in {self.seconds:.1f} s ({rate:.0f} patches/s, "
            f"{mb / self.seconds if self.seconds else 0:.1f} MB/s)"
        )


def load_plans(out: Path, rows: list[dict[str, Any]]) -> list[SlidePlan]:
    """One plan per slide with coordinates (sorted by slide id for a stable order)."""
    from pathflow.outputs import read_patch_table

    plans = []
    for row in rows:
        if row["status"] != "ok":
            continue
        coords, fr, attrs = read_patch_table(out / "coords" / f"{row['slide']}.h5")
        plans.append(
            SlidePlan(
                sid=row["slide"],
                path=Path(row["path"]),
                coords=np.ascontiguousarray(coords, dtype=np.int64),
                fractions=np.asarray(fr, dtype=np.float32),
                attrs=attrs,
                key=_core.sanitize_key(row["slide"], 60),
            )
        )
    plans.sort(key=lambda p: p.sid)
    return plans


def sample_order(plans: list[SlidePlan], shuffle: bool, seed: int) -> npt.NDArray[np.int64]:
    """(N, 2) array of (slide index, patch index) in writing order."""
    counts = [len(p.coords) for p in plans]
    slide_idx = np.repeat(np.arange(len(plans), dtype=np.int64), counts)
    patch_idx = (
        np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        if counts
        else (np.zeros(0, np.int64))
    )
    order = np.stack([slide_idx, patch_idx], axis=1)
    if shuffle and len(order):
        perm = np.random.default_rng(seed).permutation(len(order))
        order = order[perm]
    return np.ascontiguousarray(order)


def _hash_options(h: Any, params: ShardParams) -> None:
    for k in ("prefix", "max_samples", "max_mb", "format", "quality", "transcode", "shuffle",
              "seed", "sub_size"):  # fmt: skip
        h.update(f"{k}={getattr(params, k)};".encode())
    if params.multiscale:  # absent for single-resolution runs: their fingerprints stay
        h.update(f"mpps={[float(m) for m in params.mpps]};".encode())


def options_fingerprint(params: ShardParams) -> str:
    """The part of :func:`fingerprint` that depends on the shard options only."""
    h = hashlib.sha256()
    _hash_options(h, params)
    return h.hexdigest()


def fingerprint(plans: list[SlidePlan], params: ShardParams) -> str:
    h = hashlib.sha256()
    _hash_options(h, params)
    for p in plans:
        h.update(p.sid.encode())
        h.update(p.coords.tobytes())
        for k in ("patch_level", "patch_size", "target_patch_size", "target_mpp"):
            h.update(f"{k}={p.attrs.get(k)};".encode())
    return h.hexdigest()


def _finished_shards(dir: Path, prefix: str) -> tuple[list[dict[str, Any]], int]:
    """Contiguous finished shards from 0 and the number of samples they hold; removes
    temporaries and anything after the first gap (a crash leaves at most one partial)."""
    done: list[dict[str, Any]] = []
    total = 0
    i = 0
    while True:
        name = f"{prefix}-{i:06d}.tar"
        tar, idx = dir / name, dir / name.replace(".tar", ".idx")
        if not (tar.is_file() and idx.is_file()):
            break
        header = idx.open().readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            break
        n = int(header[1])
        done.append({"index": i, "name": name, "count": n, "bytes": tar.stat().st_size,
                     "first_sample": total})  # fmt: skip
        total += n
        i += 1
    for f in dir.iterdir():
        stale = f.name.startswith(".") and f.name.endswith(".tmp")
        if f.name.startswith(f"{prefix}-") and f.suffix in (".tar", ".idx"):
            try:
                num = int(f.stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            stale = stale or num >= i
        if stale:
            f.unlink()
    return done, total


def write_shards(
    out: Path,
    rows: list[dict[str, Any]],
    params: ShardParams,
    overwrite: bool = False,
    progress: bool | None = None,
    shards_dir: Path | None = None,
) -> ShardReport:
    """Write (or resume) the shards of a run into ``out/shards`` (or ``shards_dir``: a job
    array part writes ``out/shards/part-IIII``)."""
    from tqdm.auto import tqdm

    from pathflow.outputs import atomic_path
    from pathflow.tiling.sources import PatchSpec, open_source, sub_grid

    params.validate()
    t0 = time.perf_counter()
    sdir = shards_dir if shards_dir is not None else out / "shards"
    sdir.mkdir(parents=True, exist_ok=True)
    plans = load_plans(out, rows)
    fp = fingerprint(plans, params)
    plan_file = sdir / "plan.json"
    if overwrite:
        for f in sdir.iterdir():
            if f.is_file():
                f.unlink()
    opts = options_fingerprint(params)
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old.get("fingerprint") != fp:
            if old.get("options") != opts:
                raise PathflowError(
                    f"{sdir}: holds shards of a different run (slides, coordinates or shard "
                    "options changed); use --overwrite to rewrite them"
                )
            # Same options, other slides (added, or tiled again): the sample sequence is
            # another one, so every shard is written again.
            before = len(old.get("slides") or [])
            print(f"pathflow tile: warning: {sdir}: the slides changed ({before} -> "
                  f"{len(plans)}); writing all shards again", file=sys.stderr)  # fmt: skip
            for f in sdir.iterdir():
                if f.is_file():
                    f.unlink()
    if not plan_file.exists():
        doc = {"fingerprint": fp, "options": opts, "slides": [p.sid for p in plans]}
        with atomic_path(plan_file) as tmp:
            tmp.write_text(json.dumps(doc))

    done, start = _finished_shards(sdir, params.prefix)
    order = sample_order(plans, params.shuffle, params.seed)
    report = ShardReport(resumed_shards=len(done))
    report.per_slide = {p.sid: 0 for p in plans}
    threads = params.threads or (os.cpu_count() or 1)

    writer = _core.ShardWriter(
        str(sdir), params.prefix, params.max_samples, int(params.max_mb * 1e6),
        start_index=len(done), start_sample=start,
    )  # fmt: skip
    sources: dict[int, list[Any]] = {}  # slide -> [finest source, coarser sources...]
    scales: dict[int, list[Scale]] = {}
    bar = tqdm(total=len(order), initial=start, desc="shards", unit="patch", file=sys.stderr,
               disable=(not progress) if progress is not None else None)  # fmt: skip

    def source(i: int) -> list[Any]:
        if i not in sources:
            if len(sources) >= 32:  # bounded number of open slides
                oldest = next(iter(sources))
                for old in sources.pop(oldest):
                    old.close()
            p = plans[i]
            a = p.attrs
            spec = PatchSpec(
                read_level=int(a["patch_level"]),
                read_size=int(a["patch_size"]),
                out_size=int(a.get("target_patch_size", a["patch_size"])),
                format=params.format,
                quality=params.quality,
                sub_size=params.sub_size,
            )
            if spec.sub_size:
                sub_grid(spec.out_size, spec.sub_size)
            opened = [open_source(p.path, params.backend, spec, params.transcode, threads)]
            try:
                if params.multiscale:
                    scales[i] = _open_scales(p, spec, params, threads, opened)
            except BaseException:
                for s in opened:
                    s.close()
                raise
            sources[i] = opened
            if opened[0].passthrough:
                report.passthrough_slides += 1
        return sources[i]

    failed_open: dict[int, str] = {}
    # Samples per batch: 512 patches of 256 px, fewer for big regions (bounded memory).
    out_px = max((int(p.attrs.get("target_patch_size", 256)) for p in plans), default=256)
    chunk_len = max(2, min(CHUNK, CHUNK * 256 * 256 // (out_px * out_px)))
    try:
        for c0 in range(start, len(order), chunk_len):
            chunk = order[c0 : c0 + chunk_len]
            results: dict[int, list[list[bytes] | str]] = {}
            positions: dict[int, npt.NDArray[np.int64]] = {}
            for si in np.unique(chunk[:, 0]).tolist():
                sel = chunk[:, 0] == si
                positions[si] = np.flatnonzero(sel)
                if si in failed_open:
                    results[si] = [failed_open[si]] * int(sel.sum())
                    continue
                try:
                    srcs = source(si)
                except Exception as exc:
                    msg = f"{plans[si].path}: {str(exc).splitlines()[0] if str(exc) else exc}"
                    failed_open[si] = msg
                    results[si] = [msg] * int(sel.sum())
                    continue
                coords0 = plans[si].coords[chunk[sel, 1]]
                results[si] = srcs[0].produce(coords0)
                if params.multiscale:
                    results[si] = _merge_scales(results[si], srcs[1:], scales[si], coords0)
            per_pos: list[list[bytes] | str] = [b""] * len(chunk)  # type: ignore[list-item]
            for si, pos in positions.items():
                for j, r in zip(pos.tolist(), results[si], strict=False):
                    per_pos[j] = r
            keys, files = [], []
            for j, (si, pi) in enumerate(chunk.tolist()):
                r = per_pos[j]
                p = plans[si]
                if isinstance(r, str):
                    errs = report.errors.setdefault(p.sid, [])
                    if len(errs) < 5:
                        errs.append(r)
                    continue
                x, y = (int(v) for v in p.coords[pi])
                key = f"{p.key}_{x}_{y}"
                if params.multiscale:
                    meta = _sample_json(p, pi, x, y, params, 0, scales[si])
                    exts = scale_exts(params)
                    entry = [(exts[0], r[0]), ("json", meta), *zip(exts[1:], r[1:], strict=True)]
                else:
                    meta = _sample_json(p, pi, x, y, params, len(r) - 1)
                    entry = [(params.format, r[0]), ("json", meta)]
                    for k, sub in enumerate(r[1:]):
                        entry.append((f"p{k:03d}.{params.format}", sub))
                keys.append(key)
                files.append(entry)
                report.per_slide[p.sid] += 1
            writer.add_many(keys, files)
            bar.update(len(chunk))
        finished = writer.finish()
    except OSError as exc:
        writer.abort()
        reason = exc.strerror or str(exc)
        raise PathflowError(
            f"{sdir}: writing shards failed ({reason}); finished shards are kept, re-run to resume"
        ) from exc
    except BaseException:
        writer.abort()
        raise
    finally:
        for opened in sources.values():
            for s in opened:
                s.close()
        bar.close()
    report.shards = done + finished
    report.per_slide = _count_per_slide(sdir, report.shards, plans)
    report.samples = sum(s["count"] for s in report.shards)
    report.bytes = sum(s["bytes"] for s in report.shards)
    report.seconds = time.perf_counter() - t0
    _write_summary(sdir, report, plans, params)
    return report


def _open_scales(
    p: SlidePlan, spec: Any, params: ShardParams, threads: int, opened: list[Any]
) -> list[Scale]:
    """Plans the coarser resolutions of slide ``p`` and appends one source per resolution to
    ``opened``. ``--transcode never`` binds the finest entry only (coarser ones rarely line
    up with native tiles); ``always`` binds all."""
    from pathflow.slide import open_slide
    from pathflow.tiling.sources import PatchSpec, open_source

    if "mpp" not in p.attrs:
        raise InvalidArgumentError(f"{p.sid}: coords file has no slide mpp for --shard-mpps")
    if abs(float(p.attrs.get("target_mpp", 0.0)) - params.mpps[0]) > 1e-6:
        raise InvalidArgumentError(
            f"{p.sid}: the grid was laid at {p.attrs.get('target_mpp')} um/px but the finest "
            f"shard mpp is {params.mpps[0]:g} (re-tile with --overwrite)"
        )
    with open_slide(p.path, backend=params.backend) as reader:
        scales = plan_scales(reader, p.attrs, params.mpps)
    transcode = "always" if params.transcode == "always" else "auto"
    for sc in scales:
        sspec = PatchSpec(read_level=sc.level, read_size=sc.read_size, out_size=spec.out_size,
                          format=params.format, quality=params.quality)  # fmt: skip
        opened.append(open_source(p.path, params.backend, sspec, transcode, threads))
    return scales


def _merge_scales(
    fine: list[list[bytes] | str],
    sources: list[Any],
    scales: list[Scale],
    coords0: npt.NDArray[np.int64],
) -> list[list[bytes] | str]:
    """Per sample ``[finest, coarser...]`` payloads, or the first error of any of them (a
    sample is written with all its resolutions or not at all)."""
    per_scale = [src.produce(coords0 + sc.shift0) for src, sc in zip(sources, scales, strict=True)]
    out: list[list[bytes] | str] = []
    for j, r in enumerate(fine):
        parts = [r, *(coarse[j] for coarse in per_scale)]
        err = next((q for q in parts if isinstance(q, str)), None)
        out.append(err if err is not None else [q[0] for q in parts if not isinstance(q, str)])
    return out


def _count_per_slide(
    sdir: Path, shards: list[dict[str, Any]], plans: list[SlidePlan]
) -> dict[str, int]:
    """Samples per slide over all shards (resumed ones included), from the index files."""
    by_key = {p.key: p.sid for p in plans}
    counts = {p.sid: 0 for p in plans}
    for s in shards:
        with open(sdir / s["name"].replace(".tar", ".idx")) as f:
            next(f)
            for line in f:
                name = line.split(" ", 4)[3]
                key = name.split(".", 1)[0].rsplit("_", 2)[0]
                if key in by_key:
                    counts[by_key[key]] += 1
    return counts


def _sample_json(
    p: SlidePlan,
    pi: int,
    x: int,
    y: int,
    params: ShardParams,
    n_sub: int,
    scales: list[Scale] | None = None,
) -> bytes:
    a = p.attrs
    meta: dict[str, Any] = {
        "slide": p.sid,
        "x": x,
        "y": y,
        "level": int(a["patch_level"]),
        "read_size": int(a["patch_size"]),
        "patch_size": int(a.get("target_patch_size", a["patch_size"])),
        "patch_size_level0": int(a.get("patch_size_level0", a["patch_size"])),
        "mpp": float(a.get("target_mpp", a.get("mpp", 0.0))),
        "slide_mpp": float(a.get("mpp", 0.0)),
        "tissue_fraction": round(float(p.fractions[pi]), 4),
    }
    if n_sub > 0:
        g = round(n_sub**0.5)
        step = meta["patch_size_level0"] / g
        meta["sub_patch_size"] = params.sub_size
        meta["sub_coords"] = [
            [x + round(c * step), y + round(r * step)] for r in range(g) for c in range(g)
        ]
    if scales is not None:
        meta["mpps"] = [float(m) for m in params.mpps]
        meta["scale_exts"] = scale_exts(params)
        meta["scale_levels"] = [meta["level"]] + [sc.level for sc in scales]
        meta["scale_boxes"] = [[x, y, meta["patch_size_level0"]]] + [
            [x + sc.shift0, y + sc.shift0, sc.size0] for sc in scales
        ]
    return json.dumps(meta, separators=(",", ":")).encode()


def _write_summary(sdir: Path, r: ShardReport, plans: list[SlidePlan], params: ShardParams) -> None:
    from pathflow.outputs import atomic_path

    doc = {
        "format": "webdataset",
        "prefix": params.prefix,
        "image_ext": params.format,
        "samples": r.samples,
        "bytes": r.bytes,
        "shuffled": params.shuffle,
        "seed": params.seed,
        "shards": [
            {
                "name": s["name"],
                "index_file": s["name"].replace(".tar", ".idx"),
                "samples": s["count"],
                "bytes": s["bytes"],
                "first_sample": s["first_sample"],
            }
            for s in r.shards
        ],
        "slides": {p.sid: r.per_slide.get(p.sid, 0) for p in plans},
    }
    if params.multiscale:  # single-resolution summaries stay as they were
        doc["mpps"] = [float(m) for m in params.mpps]
        doc["scale_exts"] = scale_exts(params)
    with atomic_path(sdir / "shards.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
