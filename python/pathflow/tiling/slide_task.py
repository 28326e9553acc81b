"""One slide of ``pathflow tile``: open -> resolve mpp -> tissue mask (or the user's mask)
-> patch grid -> ``masks/<id>.png``, ``overlays/<id>.jpg`` and finally ``coords/<id>.h5``.

:func:`process_slide` never raises: a failure is returned as a ``failed`` manifest row whose
``error`` is one line naming the file. The coordinate file is written last and atomically, so
its presence marks a finished slide (a re-run returns a ``resumed`` row without work).

Example:
    >>> from pathflow.tiling.slide_task import process_slide  # doctest: +SKIP
    >>> row = process_slide(Path("a.svs"), "a", cfg)  # doctest: +SKIP
    >>> row["status"], row["patches"]  # doctest: +SKIP
    ('ok', 412)
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathflow.jobs.manifest import MANIFEST_FIELDS
from pathflow.tiling.config import TileConfig

if TYPE_CHECKING:
    from pathflow.slide.base import SlideReader

log = logging.getLogger("pathflow.tile")


#: Where a slide's mpp came from (coords attr and manifest column ``mpp_source``).
MPP_SOURCES = ("file", "csv", "fallback", "override")


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


def choose_mpp(
    slide: SlideReader, path: Path, cfg: TileConfig, table: dict[str, float] | None
) -> tuple[float, str]:
    """The level-0 mpp of a slide and where it comes from (:data:`MPP_SOURCES`):
    ``--force-slide-mpp`` (``override``), else the slide's ``--slide-mpp-csv`` row (``csv``),
    else the file's value when plausible (``file``; see :func:`pathflow.slide.resolve_mpp`),
    else ``--slide-mpp`` (``fallback``). Raises MissingMppError when none applies."""
    from pathflow.slide import MPP_MAX, MPP_MIN, check_mpp_override, lookup_mpp, resolve_mpp

    if cfg.force_slide_mpp is not None:
        return check_mpp_override(cfg.force_slide_mpp, "--force-slide-mpp"), "override"
    if table is not None:
        found = lookup_mpp(table, path)
        if found is not None:
            return found, "csv"
    own = slide.file_mpp
    if own is not None and MPP_MIN <= own <= MPP_MAX:
        return float(own), "file"
    if cfg.slide_mpp is not None:
        return check_mpp_override(cfg.slide_mpp, "--slide-mpp"), "fallback"
    return resolve_mpp(slide, None), "file"  # raises: missing or implausible, with the hint


def process_slide(path: Path, sid: str, cfg: TileConfig) -> dict[str, Any]:
    """Tile one slide; never raises: failures are returned as a ``failed`` row."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    row: dict[str, Any] = {k: "" for k in MANIFEST_FIELDS}
    row.update(slide=sid, path=str(path), status="failed", patches=0, resumed=False)
    coords_path = out / "coords" / f"{sid}.h5"
    try:
        if coords_path.exists() and not cfg.overwrite:
            try:
                return _resumed_row(row, coords_path)
            except Exception as exc:  # truncated or damaged: not finished, tile it again
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                row["warning"] = f"{coords_path}: unreadable ({why}); tiling {path} again"
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
        mpp_source=attrs.get("mpp_source", ""),
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
    """The work of one slide. Pixels are read once per level (the segmentation level is
    reused for the thumbnail when it is the same one); the thumbnail level is read by the
    Rust tile reader in the background while the tissue is segmented; the mask PNG and the
    overlay JPEG are encoded and written in the background while the coordinate file is
    written, which is renamed into place only after they succeeded (it still marks a
    finished slide)."""
    import numpy as np

    from pathflow.grid import intersect_grid, patch_grid
    from pathflow.outputs import write_coords_h5, write_mask_png, write_overlay
    from pathflow.slide import load_mpp_csv, open_slide
    from pathflow.tissue import (
        choose_seg_level,
        intersect_masks,
        mask_from_geojson,
        mask_from_png,
        segment_tissue,
    )

    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    table = load_mpp_csv(cfg.slide_mpp_csv) if cfg.slide_mpp_csv else None
    tparams = cfg.tissue_params()
    gparams = cfg.grid_params()
    io = _io_pool()
    pending: list[Future[None]] = []
    try:
        with open_slide(path, backend=cfg.backend) as slide:
            mpp, mpp_source = choose_mpp(slide, path, cfg, table)
            user_mask = _find_user_mask(cfg.mask, sid)
            if cfg.mask and user_mask is None:
                raise FileNotFoundError(f"{path}: no mask {sid}.png/.geojson in {cfg.mask}")
            detect = user_mask is None or cfg.mask_mode == "intersect"
            levels: dict[int, np.ndarray] = {}
            thumb_level = _thumbnail_level(slide, cfg.thumbnail_size)
            seg_level = choose_seg_level(slide, tparams, mpp) if detect else None
            thumb_read: Future[np.ndarray | None] | None = None
            if cfg.overlay and (seg_level is None or seg_level[0] != thumb_level):
                thumb_read = io.submit(_native_level, path, slide, thumb_level)
            seg = segment_tissue(slide, tparams, mpp, levels=levels) if detect else None
            drawn = None
            if user_mask is not None and user_mask.suffix.lower() in (".geojson", ".json"):
                mask_mpp = tparams.seg_mpp or 4.0
                drawn = mask_from_geojson(user_mask, slide, mask_mpp=mask_mpp, mpp=mpp)
            elif user_mask is not None:
                drawn = mask_from_png(user_mask, slide, tparams, mpp)
            if seg is None or drawn is None:  # no --mask, or --mask-mode replace
                seg = drawn if seg is None else seg
                assert seg is not None
                grid = None
            else:  # intersect: detected tissue AND the drawn mask
                seg = intersect_masks(seg, drawn)
                grid = intersect_grid(slide, seg, drawn, gparams, mpp)
            pending.append(io.submit(write_mask_png, out / "masks" / f"{sid}.png", seg.mask))
            grid = grid if grid is not None else patch_grid(slide, seg, gparams, mpp)
            tissue_mm2 = seg.tissue_area_mm2(mpp)
            if cfg.overlay:
                pixels = thumb_read.result() if thumb_read is not None else None
                if pixels is None:
                    pixels = levels.get(thumb_level)
                if pixels is None:
                    pixels = slide.read_level(thumb_level)
                thumb = _shrink(pixels, cfg.thumbnail_size)
                del levels, pixels
                pending.append(
                    io.submit(
                        write_overlay,
                        out / "overlays" / f"{sid}.jpg",
                        thumb,
                        slide.dimensions,
                        seg,
                        grid,
                    )
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
                    "mpp_source": mpp_source,
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
                before_commit=lambda: _wait(pending),
            )
    finally:
        _wait(pending, raise_first=False)
    status = "ok" if len(grid) else "no_tissue"
    return {
        "status": status,
        "patches": len(grid),
        "mpp": round(float(mpp), 6),
        "mpp_source": mpp_source,
        "target_mpp": grid.target_mpp,
        "patch_level": level,
        "patch_size": grid.read_size,
        "patch_size_level0": grid.patch_size_level0,
        "seg_level": seg.seg_level,
        "tissue_mm2": round(tissue_mm2, 4),
    }


_IO_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _io_pool() -> ThreadPoolExecutor:
    """Two background threads per process for reads and writes that release the GIL
    (a forked child gets its own: the parent's threads do not exist there)."""
    global _IO_POOL
    if _IO_POOL is None or _IO_POOL[0] != os.getpid():
        _IO_POOL = (os.getpid(), ThreadPoolExecutor(2, thread_name_prefix="pathflow-tile-io"))
    return _IO_POOL[1]


def _wait(pending: list[Future[None]], raise_first: bool = True) -> None:
    """Wait for every background write; re-raise the first failure (once)."""
    first: BaseException | None = None
    while pending:
        try:
            pending.pop(0).result()
        except BaseException as exc:
            first = first or exc
    if first is not None and raise_first:
        raise first


def _thumbnail_level(slide: SlideReader, max_size: int) -> int:
    """The level :meth:`SlideReader.thumbnail` reads for a thumbnail of ``max_size``."""
    w0, h0 = slide.dimensions
    return slide.get_best_level_for_downsample(max(w0, h0) / max(1, max_size))


def _native_level(path: Path, slide: SlideReader, level: int) -> Any:
    """A whole level of a tiled JPEG TIFF/SVS read by the Rust tile reader (own file handle,
    no GIL: safe beside the slide reader in another thread); ``None`` when the level is not
    such a page (the caller then reads it with the slide reader)."""
    if path.suffix.lower() not in (".svs", ".tif", ".tiff"):
        return None
    from pathflow import _core
    from pathflow.tiling.sources import tiff_level_info

    info = tiff_level_info(path, slide.level_dimensions[level])
    if info is None:
        return None
    try:
        tiles = _core.TiledLevel(
            str(path), info["width"], info["height"], info["tile_width"],
            info["tile_height"], info["offsets"], info["counts"], info["tables"], info["rgb"],
        )  # fmt: skip
        return tiles.read_region(0, 0, info["width"], info["height"])
    except Exception:  # a page the Rust reader refuses: let the slide reader try
        return None


def _shrink(pixels: Any, max_size: int) -> Any:
    """``pixels`` as :meth:`SlideReader.thumbnail` returns them: Lanczos-reduced so that the
    longer side is at most ``max_size`` (never enlarged)."""
    import numpy as np

    if max(pixels.shape[:2]) <= max_size:
        return pixels
    from PIL import Image

    img = Image.fromarray(pixels)
    img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    return np.asarray(img)


def _version() -> str:
    from pathflow import __version__

    return __version__
