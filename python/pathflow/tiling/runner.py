"""Batch driver of ``pathflow tile``: many slides, parallel processes, resumable.

Per slide (in a worker process): open -> resolve mpp -> tissue mask (or the user's mask)
-> patch grid -> ``masks/<id>.png``, ``overlays/<id>.jpg`` and finally
``coords/<id>.h5``. The coordinate file is written last and atomically, so its presence
marks a finished slide: a re-run skips it. A failing slide becomes a ``failed`` row in
``manifest.csv`` (and a line on stderr) and the batch goes on.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.tiling.config import TileConfig

log = logging.getLogger("pathflow.tile")

SLIDE_EXTENSIONS = (
    ".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".svslide", ".bif",
    ".jpg", ".jpeg", ".png", ".bmp",
)  # fmt: skip

MANIFEST_FIELDS = [
    "slide", "path", "status", "patches", "mpp", "target_mpp", "patch_level", "patch_size",
    "patch_size_level0", "seg_level", "tissue_mm2", "seconds", "resumed", "shard_samples",
    "error",
]  # fmt: skip


@dataclass
class TileReport:
    """Outcome of a batch: one manifest row per slide."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    shards: Any = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n = len(self.rows)
        by: dict[str, int] = {}
        for r in self.rows:
            by[r["status"]] = by.get(r["status"], 0) + 1
        resumed = sum(1 for r in self.rows if r.get("resumed"))
        patches = sum(int(r.get("patches") or 0) for r in self.rows)
        parts = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
        text = (
            f"tiled {n} slide(s) in {self.seconds:.1f} s: {parts}"
            f"{f', resumed {resumed}' if resumed else ''}; {patches} patches -> {self.out}"
        )
        if self.shards is not None:
            text += "\n" + self.shards.summary()
        return text


def slide_id(path: Path) -> str:
    """Slide identifier: the file name without its extension (dots inside are kept)."""
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def discover(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Expand files and folders into slide paths (folders: known extensions, sorted).

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
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _one_line(exc: BaseException, path: Path) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in str(exc):
        msg = f"{exc.filename}: file not found"
    else:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if str(path) not in msg and path.name not in msg:
        msg = f"{path}: {msg}"
    return msg.replace("\n", " ")


def _find_user_mask(mask: str | None, sid: str) -> Path | None:
    if not mask:
        return None
    p = Path(mask)
    if p.is_dir():
        for ext in (".geojson", ".json", ".png"):
            cand = p / f"{sid}{ext}"
            if cand.is_file():
                return cand
        return None
    return p


def _mpp_override(cfg: TileConfig, path: Path, table: dict[str, float] | None) -> float | None:
    if table is not None:
        from pathflow.slide import lookup_mpp

        found = lookup_mpp(table, path)
        if found is not None:
            return found
    return cfg.slide_mpp


def process_slide(path: Path, sid: str, cfg: TileConfig) -> dict[str, Any]:
    """Tile one slide; never raises: failures are returned as a ``failed`` row."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    row: dict[str, Any] = {k: "" for k in MANIFEST_FIELDS}
    row.update(slide=sid, path=str(path), status="failed", patches=0, resumed=False)
    coords_path = out / "coords" / f"{sid}.h5"
    try:
        if coords_path.exists() and not cfg.overwrite:
            return _resumed_row(row, coords_path)
        row.update(_tile_one(path, sid, cfg, out))
    except Exception as exc:  # one bad slide must never stop the batch
        row["error"] = _one_line(exc, path)
        log.debug("slide %s failed:\n%s", path, traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _resumed_row(row: dict[str, Any], coords_path: Path) -> dict[str, Any]:
    from pathflow.outputs import read_coords_h5

    coords, attrs = read_coords_h5(coords_path)
    row.update(
        status="ok" if len(coords) else "no_tissue",
        patches=len(coords),
        mpp=attrs.get("mpp", ""),
        target_mpp=attrs.get("target_mpp", ""),
        patch_level=attrs.get("patch_level", ""),
        patch_size=attrs.get("patch_size", ""),
        patch_size_level0=attrs.get("patch_size_level0", ""),
        seg_level=attrs.get("seg_level", ""),
        tissue_mm2=attrs.get("tissue_mm2", ""),
        resumed=True,
        seconds=0.0,
    )
    return row


def _tile_one(path: Path, sid: str, cfg: TileConfig, out: Path) -> dict[str, Any]:
    from pathflow.grid import patch_grid
    from pathflow.outputs import write_coords_h5, write_mask_png, write_overlay
    from pathflow.slide import load_mpp_csv, open_slide, resolve_mpp
    from pathflow.tissue import mask_from_geojson, mask_from_png, segment_tissue

    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    table = load_mpp_csv(cfg.slide_mpp_csv) if cfg.slide_mpp_csv else None
    override = _mpp_override(cfg, path, table)
    tparams = cfg.tissue_params()
    gparams = cfg.grid_params()
    with open_slide(path, backend=cfg.backend) as slide:
        mpp = resolve_mpp(slide, override)
        user_mask = _find_user_mask(cfg.mask, sid)
        if cfg.mask and user_mask is None:
            raise FileNotFoundError(f"{path}: no mask {sid}.png/.geojson in {cfg.mask}")
        if user_mask is None:
            seg = segment_tissue(slide, tparams, mpp)
        elif user_mask.suffix.lower() in (".geojson", ".json"):
            seg = mask_from_geojson(user_mask, slide, mask_mpp=tparams.seg_mpp or 4.0, mpp=mpp)
        else:
            seg = mask_from_png(user_mask, slide, tparams, mpp)
        grid = patch_grid(slide, seg, gparams, mpp)
        tissue_mm2 = seg.tissue_area_mm2(mpp)
        write_mask_png(out / "masks" / f"{sid}.png", seg.mask)
        if cfg.overlay:
            thumb = slide.thumbnail(cfg.thumbnail_size)
            import numpy as np

            write_overlay(
                out / "overlays" / f"{sid}.jpg", np.asarray(thumb), slide.dimensions, seg, grid
            )
        level = grid.read_level
        write_coords_h5(
            out / "coords" / f"{sid}.h5",
            name=sid,
            grid=grid,
            level_dim=slide.level_dimensions[level],
            downsample=slide.level_downsample_xy(level),
            extra_attrs={
                "mpp": float(mpp),
                "file_mpp": float(slide.file_mpp) if slide.file_mpp else float("nan"),
                "slide_path": str(path),
                "backend": slide.backend,
                "preset": cfg.preset,
                "contour_fn": gparams.contour_fn,
                "layout": gparams.layout,
                "seg_level": int(seg.seg_level),
                "mask_source": seg.source,
                "tissue_mm2": float(tissue_mm2),
                "level0_dim": list(slide.dimensions),
                "pathflow_version": _version(),
            },
        )
    status = "ok" if len(grid) else "no_tissue"
    return {
        "status": status,
        "patches": len(grid),
        "mpp": round(float(mpp), 6),
        "target_mpp": grid.target_mpp,
        "patch_level": level,
        "patch_size": grid.read_size,
        "patch_size_level0": grid.patch_size_level0,
        "seg_level": seg.seg_level,
        "tissue_mm2": round(tissue_mm2, 4),
    }


def _version() -> str:
    from pathflow import __version__

    return __version__


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    from pathflow.outputs import atomic_path

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _init_worker(threads: int) -> None:
    from pathflow import _core

    if threads > 0:
        _core.set_num_threads(threads)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def tile_slides(cfg: TileConfig, progress: bool | None = None) -> TileReport:
    """Run ``pathflow tile`` for a resolved config; returns the report (never raises for
    a bad slide; configuration errors do raise)."""
    from pathflow.data import sample_slide

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = discover(cfg.inputs, cfg.recursive)
    paths += [sample_slide(name) for name in cfg.sample]
    cfg.save(out / "config.yaml")
    report = TileReport(out=out)
    if not paths:
        report.seconds = time.perf_counter() - t0
        _write_manifest(out / "manifest.csv", [])
        return report

    # Slide ids must be unique: a second slide with the same id fails instead of overwriting.
    jobs: list[tuple[int, Path, str]] = []
    rows: dict[int, dict[str, Any]] = {}
    owner: dict[str, Path] = {}
    for i, p in enumerate(paths):
        sid = slide_id(p)
        if sid in owner:
            row: dict[str, Any] = {k: "" for k in MANIFEST_FIELDS}
            row.update(slide=sid, path=str(p), status="failed", patches=0, resumed=False)
            row["error"] = f"{p}: duplicate slide id {sid!r} (also {owner[sid]})"
            rows[i] = row
            continue
        owner[sid] = p
        jobs.append((i, p, sid))

    cpus = _cpu_count()
    workers = cfg.workers or min(len(jobs), cpus, 8)
    threads = cfg.threads or max(1, cpus // max(1, workers))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(paths),
        desc="pathflow tile",
        unit="slide",
        disable=(not progress) if progress is not None else None,
        file=sys.stderr,
    )
    bar.update(len(rows))

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if row["status"] == "failed":
            bar.write(f"pathflow tile: FAILED {row['error']}", file=sys.stderr)
        elif row["status"] == "no_tissue" and not row.get("resumed"):
            bar.write(f"pathflow tile: warning: {row['path']}: no tissue found", file=sys.stderr)
        bar.update(1)
        bar.set_postfix_str(row["slide"][:30])
        _write_manifest(out / "manifest.csv", [rows[k] for k in sorted(rows)])

    if workers <= 1:
        _init_worker(threads)
        for i, p, sid in jobs:
            finish(i, process_slide(p, sid, cfg))
    else:
        _run_pool(jobs, cfg, workers, threads, finish)
    bar.close()
    report.rows = [rows[k] for k in sorted(rows)]
    _write_manifest(out / "manifest.csv", report.rows)
    if cfg.shards:
        _shards_phase(cfg, report, progress)
        _write_manifest(out / "manifest.csv", report.rows)
    report.seconds = time.perf_counter() - t0
    return report


def _shards_phase(cfg: TileConfig, report: TileReport, progress: bool | None) -> None:
    from pathflow.tiling.shards import write_shards

    res = write_shards(Path(cfg.out), report.rows, cfg.shard_params(), cfg.overwrite, progress)
    report.shards = res
    for r in report.rows:
        if r["status"] == "ok":
            r["shard_samples"] = res.per_slide.get(r["slide"], 0)
            errs = res.errors.get(r["slide"])
            if errs:
                r["status"] = "failed"
                r["error"] = f"shards: {errs[0]}"
                print(f"pathflow tile: FAILED {r['error']}", file=sys.stderr)


def _run_pool(
    jobs: list[tuple[int, Path, str]],
    cfg: TileConfig,
    workers: int,
    threads: int,
    finish: Any,
) -> None:
    """Process pool that survives a worker crash (a native reader segfaulting on one slide):
    slides caught in a broken pool are re-run one per process, so only the culprit fails."""
    import multiprocessing as mp
    from concurrent.futures import as_completed

    ctx = mp.get_context("spawn")
    crashed: list[tuple[int, Path, str]] = []
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as ex:
        futs: dict[Future[dict[str, Any]], tuple[int, Path, str]] = {
            ex.submit(process_slide, p, sid, cfg): (i, p, sid) for i, p, sid in jobs
        }
        for fut in as_completed(futs):
            try:
                row = fut.result()
            except BrokenProcessPool:
                crashed.append(futs[fut])
                continue
            finish(futs[fut][0], row)
    for i, p, sid in sorted(crashed):
        with ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_init_worker, initargs=(threads * workers,)
        ) as ex:
            try:
                row = ex.submit(process_slide, p, sid, cfg).result()
            except BrokenProcessPool:
                row = {k: "" for k in MANIFEST_FIELDS}
                row.update(slide=sid, path=str(p), status="failed", patches=0, resumed=False)
                row["error"] = f"{p}: the slide reader crashed the worker process"
        finish(i, row)
