"""Generate a large, realistic Aperio-style pyramidal test slide from real H&E tissue.

The slide is an SVS-like TIFF (``tifffile``): JPEG-compressed 256x256 tiles, level 0 first with an
Aperio ``ImageDescription`` (so OpenSlide/tiffslide detect the ``aperio`` vendor and the MPP), a
stripped thumbnail as the second page (Aperio convention), then the reduced levels (downsample 4
each) as further tiled pages.

Content is never noise: rotated/flipped copies of a real tissue region (by default the CMU
``cmu_small_region.svs`` sample at ~0.5 mpp, upsampled 2x to look like 0.25 mpp) are scattered
over a blob-shaped area of a near-white background until ~50% of the slide is covered by tissue.
Overlapping copies are composed "darker wins" so tissue interleaves like a folded resection.

Level 0 is rendered strip by strip (one tile row at a time) and fed to tifffile as a tile
iterator, so a 32768^2 slide needs a few hundred MB of memory, not 3 GB.

    python benches/synthetic_slide.py [--size 32768] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

__all__ = [
    "GENERATOR_VERSION",
    "Layout",
    "cached_large_slide",
    "default_cache_dir",
    "load_default_source",
    "make_large_slide",
    "plan_layout",
]

GENERATOR_VERSION = 1
APERIO_VERSION = "Aperio Image Library v12.0.15"
LEVEL_FACTOR = 4
MIN_LEVEL_SIZE = 512


# --------------------------------------------------------------------------- source


def _find_sample(filename: str, name: str) -> Path:
    try:
        from pathflow.data import sample_slide  # type: ignore[import-not-found]

        return Path(sample_slide(name))
    except Exception:
        pass
    for d in (os.environ.get("PATHFLOW_SAMPLES_DIR"), "/tmp/samples"):
        if d and (Path(d) / filename).is_file():
            return Path(d) / filename
    raise FileNotFoundError(
        f"sample {name!r} ({filename}) not found: install pathflow.data or set "
        "PATHFLOW_SAMPLES_DIR, or pass source_rgb explicitly"
    )


def load_default_source() -> np.ndarray:
    """Level 0 of the CMU small region (2220x2967 RGB at 0.499 mpp) read with OpenSlide."""
    import openslide

    with openslide.OpenSlide(str(_find_sample("cmu_small_region.svs", "cmu-small"))) as s:
        rgba = s.read_region((0, 0), 0, s.level_dimensions[0])
    return np.ascontiguousarray(np.asarray(rgba)[:, :, :3])


def _tissue_alpha(src: np.ndarray) -> np.ndarray:
    """Soft (0..1 float32) tissue mask of the source, slightly dilated and feathered."""
    sat = cv2.cvtColor(src, cv2.COLOR_RGB2HSV)[:, :, 1]
    sat = cv2.medianBlur(sat, 5)
    mask = (sat > 12).astype(np.uint8)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    )
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2.5)


def _window(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Ragged rounded window (float32 0..1, h x w) so that tissue cut by the source's borders
    gets an irregular, natural-looking edge instead of a straight line."""
    f = 4  # build the (smooth) level-set field at 1/4 scale, threshold at full scale
    lh, lw = max(8, h // f), max(8, w // f)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    dx = (xx - (lw - 1) / 2) / (0.5 * lw)
    dy = (yy - (lh - 1) / 2) / (0.5 * lh)
    r = (np.abs(dx) ** 3 + np.abs(dy) ** 3) ** (1 / 3)  # superellipse: keeps most of the area
    theta = np.arctan2(dy, dx)
    edge = np.full_like(r, 0.9)
    for i in range(3, 10):
        edge += rng.uniform(0.01, 0.03) * np.cos(i * theta + rng.uniform(0, 2 * np.pi))
    noise = cv2.GaussianBlur(rng.standard_normal((lh, lw)).astype(np.float32), (0, 0), 30 / f)
    noise *= 0.05 / max(float(noise.std()), 1e-6)
    fine = cv2.GaussianBlur(rng.standard_normal((lh, lw)).astype(np.float32), (0, 0), 6 / f)
    noise += fine * (0.015 / max(float(fine.std()), 1e-6))
    # clamp so the window never reaches the piece border (no straight cuts): r <= 0.96
    np.clip(noise, -0.04, None, out=noise)
    field = cv2.resize(r + noise - np.minimum(edge, 0.92), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur((field <= 0).astype(np.float32), (0, 0), 2.0)


def _background(src: np.ndarray) -> tuple[int, int, int]:
    sat = cv2.cvtColor(src, cv2.COLOR_RGB2HSV)[:, :, 1]
    bg = src[(sat < 6) & (src.min(axis=2) > 200)]
    if len(bg) < 1000:
        return (245, 243, 244)
    med = np.median(bg, axis=0)
    return (int(med[0]), int(med[1]), int(med[2]))


# --------------------------------------------------------------------------- layout


def _orient(a: np.ndarray, o: int) -> np.ndarray:
    """View of ``a`` rotated by (o % 4) * 90 degrees, mirrored if o >= 4."""
    v = np.rot90(a, o % 4)
    return v[:, ::-1] if o >= 4 else v


@dataclass
class Layout:
    """Placements in level-0 pixels (multiples of the coarsest level's downsample)."""

    placements: list[tuple[int, int, int]]  # (x0, y0, orientation)
    coverage: float  # fraction of the slide covered by tissue footprints (coarse estimate)
    size: tuple[int, int]
    piece_size: tuple[int, int]  # unoriented (w, h) at level 0


def _level_downsamples(size: tuple[int, int]) -> list[int]:
    ds = [1]
    while max(size) // (ds[-1] * LEVEL_FACTOR) >= MIN_LEVEL_SIZE:
        ds.append(ds[-1] * LEVEL_FACTOR)
    return ds


def _blob_region(w: int, h: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Union of n x n irregular ellipse-like fragments (bool, h x w), ~65% of the canvas."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    region = np.zeros((h, w), dtype=bool)
    cw, ch = w / n, h / n
    for j in range(n):
        for i in range(n):
            cx = cw * (i + rng.uniform(0.45, 0.55))
            cy = ch * (j + rng.uniform(0.45, 0.55))
            dx = (xx - cx) / (cw * rng.uniform(0.42, 0.47))
            dy = (yy - cy) / (ch * rng.uniform(0.42, 0.47))
            theta = np.arctan2(dy, dx)
            edge = np.ones_like(theta)
            for k in range(2, 6):
                edge += rng.uniform(0.03, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
            region |= np.hypot(dx, dy) <= edge
    return region


def plan_layout(
    alpha: np.ndarray,
    piece_size: tuple[int, int],
    size: tuple[int, int],
    grid: int,
    rng: np.random.Generator,
    target: float = 0.5,
    max_overlap: float = 0.35,
    max_tries: int = 6000,
) -> Layout:
    """Greedy random placement at 1/``grid`` scale until ``target`` of the canvas is tissue."""
    gw, gh = size[0] // grid, size[1] // grid
    pw, ph = piece_size[0] // grid, piece_size[1] // grid
    fp = cv2.resize(alpha, (pw, ph), interpolation=cv2.INTER_AREA) > 0.5
    footprints = [np.ascontiguousarray(_orient(fp, o)) for o in range(8)]
    # several separate tissue fragments when the slide is large compared to one piece
    n_frag = max(1, min(3, int(min(gw, gh) / (2.5 * max(pw, ph)))))
    inside = 0.85 if n_frag > 1 else 0.6
    fits = max(pw, ph) < min(gw, gh)
    region = _blob_region(gw, gh, n_frag, rng)
    ry, rx = np.nonzero(region)
    cover = np.zeros((gh, gw), dtype=bool)
    placements: list[tuple[int, int, int]] = []
    for _ in range(max_tries):
        if cover.mean() >= target:
            break
        o = int(rng.integers(8))
        f = footprints[o]
        fh, fw = f.shape
        i = int(rng.integers(len(ry)))
        x0, y0 = int(rx[i]) - fw // 2, int(ry[i]) - fh // 2
        # clip the footprint to the canvas
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + fw, gw), min(y0 + fh, gh)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        fc = f[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        n = int(fc.sum())
        if n < (f.sum() if fits else 0.3 * f.sum()):  # tissue would be cut by the slide border
            continue
        win = cover[cy0:cy1, cx0:cx1]
        reg = region[cy0:cy1, cx0:cx1]
        if (fc & win).sum() > max_overlap * n or (fc & reg).sum() < inside * n:
            continue
        win |= fc
        placements.append((x0 * grid, y0 * grid, o))
    return Layout(placements, float(cover.mean()), size, piece_size)


# --------------------------------------------------------------------------- rendering


class _LevelRenderer:
    """Renders rows of one pyramid level from the blended source pieces."""

    def __init__(
        self,
        src: np.ndarray,
        alpha: np.ndarray,
        bg: tuple[int, int, int],
        layout: Layout,
        ds: int,
    ) -> None:
        pw, ph = layout.piece_size[0] // ds, layout.piece_size[1] // ds
        interp = cv2.INTER_CUBIC if pw > src.shape[1] else cv2.INTER_AREA
        piece = cv2.resize(src, (pw, ph), interpolation=interp)
        a = cv2.resize(alpha, (pw, ph), interpolation=cv2.INTER_LINEAR)
        bgf = np.asarray(bg, dtype=np.float32)
        # blend towards the background in row chunks (bounded float32 temporaries)
        for r in range(0, ph, 512):
            chunk = piece[r : r + 512].astype(np.float32)
            chunk -= bgf
            chunk *= a[r : r + 512, :, None]
            chunk += bgf + 0.5
            piece[r : r + 512] = np.clip(chunk, 0, 255).astype(np.uint8)
        del a
        self.piece = piece
        self.lum = cv2.cvtColor(self.piece, cv2.COLOR_RGB2GRAY)
        self.bg = np.asarray(bg, dtype=np.uint8)
        self.bg_lum = int(cv2.cvtColor(self.bg.reshape(1, 1, 3), cv2.COLOR_RGB2GRAY)[0, 0])
        self.width, self.height = layout.size[0] // ds, layout.size[1] // ds
        self.places = []
        for x0, y0, o in layout.placements:
            w, h = (pw, ph) if o % 2 == 0 else (ph, pw)
            self.places.append(
                (x0 // ds, y0 // ds, w, h, _orient(self.piece, o), _orient(self.lum, o))
            )
        self.places.sort(key=lambda p: p[1])

    def rows(self, y0: int, y1: int, width: int | None = None) -> np.ndarray:
        """RGB rows [y0, y1) of the level, ``width`` columns (>= level width, bg padded)."""
        width = self.width if width is None else width
        out = np.empty((y1 - y0, width, 3), dtype=np.uint8)
        out[:] = self.bg
        lum = np.full((y1 - y0, width), self.bg_lum, dtype=np.uint8)
        for px, py, w, h, img, lim in self.places:
            if py >= y1:
                break
            if py + h <= y0:
                continue
            r0, r1 = max(y0, py), min(y1, py + h, self.height)
            c0, c1 = max(0, px), min(self.width, px + w)
            if r1 <= r0 or c1 <= c0:
                continue
            s_img = img[r0 - py : r1 - py, c0 - px : c1 - px]
            s_lum = lim[r0 - py : r1 - py, c0 - px : c1 - px]
            d_lum = lum[r0 - y0 : r1 - y0, c0:c1]
            darker = s_lum < d_lum
            np.copyto(out[r0 - y0 : r1 - y0, c0:c1], s_img, where=darker[:, :, None])
            np.minimum(d_lum, s_lum, out=d_lum)
        return out

    def tiles(self, tile: int) -> Iterator[np.ndarray]:
        """Row-major tiles of the level (edge tiles padded with background)."""
        ntx = math.ceil(self.width / tile)
        for y in range(0, self.height, tile):
            strip = self.rows(y, y + tile, ntx * tile)
            if strip.shape[0] < tile:  # pragma: no cover - only for sizes not multiple of tile
                pad = np.empty((tile - strip.shape[0], *strip.shape[1:]), np.uint8)
                pad[:] = self.bg
                strip = np.concatenate([strip, pad])
            for tx in range(ntx):
                yield np.ascontiguousarray(strip[:, tx * tile : (tx + 1) * tile])


# --------------------------------------------------------------------------- writer


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def make_large_slide(
    out_path: str | os.PathLike[str],
    source_rgb: np.ndarray | None = None,
    size: int | tuple[int, int] = (32768, 32768),
    mpp: float = 0.25,
    tile: int = 256,
    quality: int = 90,
    seed: int = 0,
    upsample: int = 2,
    target_coverage: float = 0.5,
) -> Path:
    """Write an Aperio-style pyramidal JPEG TIFF of ``size`` = (width, height) to ``out_path``.

    ``source_rgb`` (H, W, 3) uint8 is real tissue at ~``mpp * upsample`` microns per pixel
    (default: the CMU small region at 0.5 mpp). Levels have downsample 4 (32768, 8192, 2048,
    512 for the default size). Returns the path.
    """
    out_path = Path(out_path)
    w0, h0 = _as_size(size)
    if w0 % tile or h0 % tile:
        raise ValueError(f"size {w0}x{h0} must be a multiple of the tile size {tile}")
    ds_list = _level_downsamples((w0, h0))
    coarse = ds_list[-1]
    if source_rgb is None:
        source_rgb = load_default_source()
    src = np.ascontiguousarray(np.asarray(source_rgb)[:, :, :3], dtype=np.uint8)
    # crop so that the upsampled piece is a multiple of the coarsest downsample (exact levels)
    unit = max(1, coarse // upsample) if coarse % upsample == 0 else coarse
    src = np.ascontiguousarray(src[: src.shape[0] // unit * unit, : src.shape[1] // unit * unit])
    piece_size = (src.shape[1] * upsample, src.shape[0] * upsample)

    rng = np.random.default_rng(seed)
    alpha = _tissue_alpha(src) * _window(src.shape[0], src.shape[1], rng)
    bg = _background(src)
    grid = coarse * max(1, 64 // coarse)  # plan at <= 1/64 scale (fast), aligned to all levels
    layout = plan_layout(alpha, piece_size, (w0, h0), grid, rng, target=target_coverage)

    mag = 40 if mpp <= 0.3 else 20
    desc0 = (
        f"{APERIO_VERSION} \n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        f"|AppMag = {mag}|MPP = {mpp:.4f}"
    )
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    bigtiff = w0 * h0 * 3 > 2**32  # JPEG at Q<=95 stays far below 4 GiB up to that size
    out_path.parent.mkdir(parents=True, exist_ok=True)

    with tifffile.TiffWriter(out_path, bigtiff=bigtiff) as tw:
        for i, ds in enumerate(ds_list):
            r = _LevelRenderer(src, alpha, bg, layout, ds)
            desc = desc0
            if i > 0:
                desc = (
                    f"{APERIO_VERSION} \n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) "
                    f"-> {r.width}x{r.height} JPEG/RGB Q={quality}"
                )
            tw.write(
                r.tiles(tile),
                shape=(r.height, r.width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                description=desc,
                metadata=None,
                **jpeg,
            )
            if i == 0:
                del r
                thumb = _thumbnail(src, alpha, bg, layout, ds_list)
                th, tw_ = thumb.shape[:2]
                tw.write(
                    thumb,
                    photometric="rgb",
                    rowsperstrip=16,
                    description=f"{APERIO_VERSION} \n{w0}x{h0} -> {tw_}x{th} - ",
                    metadata=None,
                    **jpeg,
                )
    return out_path


def _thumbnail(
    src: np.ndarray,
    alpha: np.ndarray,
    bg: tuple[int, int, int],
    layout: Layout,
    ds_list: list[int],
    max_side: int = 1024,
) -> np.ndarray:
    w0, h0 = layout.size
    ds = next((d for d in ds_list if max(w0, h0) // d <= 4 * max_side), ds_list[-1])
    r = _LevelRenderer(src, alpha, bg, layout, ds)
    img = r.rows(0, r.height)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(
            img,
            (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
    return np.ascontiguousarray(img)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    base = os.environ.get("PATHFLOW_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "pathflow"


def cached_large_slide(
    cache_dir: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = 32768,
    **kwargs,
) -> Path:
    """Build (once) and return the synthetic slide under ``<cache>/bench/``.

    ``kwargs`` go to :func:`make_large_slide`. The file name encodes size, seed, mpp, quality,
    a CRC of a custom ``source_rgb`` and the generator version; the file is written to a
    temporary name in the same directory and moved into place atomically (os.replace).
    """
    w, h = _as_size(size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bench = root / "bench"
    seed = kwargs.get("seed", 0)
    mpp = kwargs.get("mpp", 0.25)
    quality = kwargs.get("quality", 90)
    src_tag = ""
    if kwargs.get("source_rgb") is not None:  # custom tissue: key the cache on its content
        src_tag = f"_src{zlib.crc32(np.ascontiguousarray(kwargs['source_rgb']).tobytes()):08x}"
    name = f"synthetic_{w}x{h}_mpp{mpp:g}_q{quality}_s{seed}{src_tag}_v{GENERATOR_VERSION}.svs"
    path = bench / name
    if path.is_file() and path.stat().st_size > 0:
        return path
    bench.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=bench)
    os.close(fd)
    try:
        make_large_slide(tmp, size=(w, h), **kwargs)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual tool
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32768)
    ap.add_argument("--out", type=Path, default=None, help="write here instead of the cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.out is not None:
        path = make_large_slide(args.out, size=args.size, seed=args.seed, quality=args.quality)
    else:
        path = cached_large_slide(size=args.size, seed=args.seed, quality=args.quality)
    dt = time.perf_counter() - t0
    with tifffile.TiffFile(path) as tf:
        low = tf.pages[-1].asarray()
        levels = [p.shape[:2] for p in tf.pages if p.is_tiled]
    sat = cv2.medianBlur(cv2.cvtColor(low, cv2.COLOR_RGB2HSV)[:, :, 1], 7)
    print(f"path: {path}")
    print(f"levels (h, w): {levels}")
    print(f"tissue fraction (saturation > 8 on the smallest level): {(sat > 8).mean():.3f}")
    print(f"size on disk: {path.stat().st_size / 2**20:.1f} MiB")
    print(f"elapsed: {dt:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    _main()
