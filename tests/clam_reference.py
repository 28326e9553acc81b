"""Independent re-implementation of CLAM's tissue segmentation and patch-coordinate logic.

This module exists only for testing and benchmarking: it answers "what would CLAM's
``create_patches_fp.py`` output for this slide?" so that pathflow's own (fast) tiling can be
compared against the de-facto baseline of the field.

It reproduces the *classic* CLAM behaviour (mahmoodlab/CLAM, ``WholeSlideImage.segmentTissue``,
``_filter_contours``, ``process_contour``, ``isInContours``/``isInHoles`` and the contour-checking
functions ``isInContourV1``/``V2``/``V3_Easy``/``V3_Hard``), including its quirks:

* the saturation channel of ``cv2.COLOR_RGB2HSV`` is median-blurred and thresholded;
* the area thresholds ``a_t``/``a_h`` are in units of a 512x512 level-0 "reference patch";
* a contour's area is its outer area minus the area of *all* its holes (before hole filtering);
* holes are sorted by area, truncated to ``max_n_holes`` and kept if larger than ``a_h``;
* seg-level contours are scaled to level 0 with ``int32`` truncation (not rounding);
* candidate grids come from ``np.meshgrid(..., indexing="ij")`` (x-major order);
* ``four_pt`` accepts a patch if any of four points shifted by ``patch_size // 4`` around the
  centre lies inside or on the contour; a patch is rejected if its centre lies strictly inside a
  kept hole;
* a contour that yields exactly one patch contributes nothing (CLAM keeps results only when
  ``len(results) > 1``).

The code was written from the described behaviour (it is not a copy of CLAM's source text) and is
serial (CLAM uses a multiprocessing pool; results are identical). Points are passed to
``cv2.pointPolygonTest`` as Python numbers, which recent OpenCV releases require.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "ClamSegmentation",
    "binary_mask",
    "clam_level_downsamples",
    "clam_seg_level",
    "filter_contours",
    "patch_coords",
    "patch_coords_for_contour",
    "run_clam_image",
    "run_clam_openslide",
    "scale_contours",
    "scale_holes",
    "segment_tissue",
    "tissue_mask",
]

CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")


@dataclass
class ClamSegmentation:
    """CLAM segmentation result.

    ``contours_seg``/``holes_seg`` are the kept contours at segmentation-level resolution,
    ``contours_l0``/``holes_l0`` the same scaled to level 0 the CLAM way (int32 truncation);
    ``holes_*[i]`` belongs to ``contours_*[i]``. ``binary`` is the thresholded (and closed)
    saturation image the contours were extracted from.
    """

    contours_seg: list[np.ndarray]
    holes_seg: list[list[np.ndarray]]
    contours_l0: list[np.ndarray]
    holes_l0: list[list[np.ndarray]]
    binary: np.ndarray
    downsample: tuple[float, float] = (1.0, 1.0)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_contours(self) -> int:
        return len(self.contours_l0)

    @property
    def n_holes(self) -> int:
        return sum(len(h) for h in self.holes_l0)

    def mask(self) -> np.ndarray:
        """Seg-level tissue mask (uint8 0/255) drawn from the kept contours and holes."""
        return tissue_mask(self.binary.shape[:2], self.contours_seg, self.holes_seg)


# --------------------------------------------------------------------------- segmentation


def binary_mask(
    img_rgb: np.ndarray,
    sthresh: int = 8,
    mthresh: int = 7,
    close: int = 4,
    use_otsu: bool = False,
    sthresh_up: int = 255,
) -> np.ndarray:
    """HSV saturation -> median blur -> (Otsu or fixed) threshold -> optional closing."""
    img = np.ascontiguousarray(img_rgb)
    # COLOR_RGB2HSV accepts 3 or 4 channels (CLAM feeds openslide's RGBA straight in).
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(np.ascontiguousarray(hsv[:, :, 1]), mthresh)
    if use_otsu:
        _, binary = cv2.threshold(sat, 0, sthresh_up, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(sat, sthresh, sthresh_up, cv2.THRESH_BINARY)
    if close > 0:
        kernel = np.ones((close, close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    return binary


def filter_contours(
    contours: Sequence[np.ndarray],
    hierarchy: np.ndarray,
    a_t: float,
    a_h: float,
    max_n_holes: int,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """CLAM's ``_filter_contours``; ``hierarchy`` is the (N, 2) [first_child, parent] array."""
    kept: list[int] = []
    kept_hole_ids: list[np.ndarray] = []
    for idx in np.flatnonzero(hierarchy[:, 1] == -1):
        hole_ids = np.flatnonzero(hierarchy[:, 1] == idx)
        area = cv2.contourArea(contours[idx])
        area = area - np.array([cv2.contourArea(contours[h]) for h in hole_ids]).sum()
        if area == 0:
            continue
        if a_t < area:
            kept.append(int(idx))
            kept_hole_ids.append(hole_ids)

    foreground = [contours[i] for i in kept]
    holes: list[list[np.ndarray]] = []
    for hole_ids in kept_hole_ids:
        candidates = sorted((contours[h] for h in hole_ids), key=cv2.contourArea, reverse=True)
        candidates = candidates[:max_n_holes]
        holes.append([h for h in candidates if cv2.contourArea(h) > a_h])
    return foreground, holes


def scale_contours(contours: Sequence[np.ndarray], scale: Sequence[float]) -> list[np.ndarray]:
    """Seg level -> level 0: float multiply then int32 truncation, as CLAM does."""
    s = np.asarray(scale, dtype=np.float64)
    return [np.array(c * s, dtype=np.int32) for c in contours]


def scale_holes(
    holes: Sequence[Sequence[np.ndarray]], scale: Sequence[float]
) -> list[list[np.ndarray]]:
    return [scale_contours(h, scale) for h in holes]


def segment_tissue(
    img_rgb: np.ndarray,
    downsample_xy: tuple[float, float] = (1.0, 1.0),
    sthresh: int = 8,
    sthresh_up: int = 255,
    mthresh: int = 7,
    close: int = 4,
    use_otsu: bool = False,
    a_t: float = 100,
    a_h: float = 16,
    max_n_holes: int = 8,
    ref_patch_size: int = 512,
    keep_ids: Sequence[int] = (),
    exclude_ids: Sequence[int] = (),
) -> ClamSegmentation:
    """CLAM ``segmentTissue`` on an image already read at the segmentation level.

    ``downsample_xy`` is the (estimated) level-0/seg-level downsample used for the area units
    and the scaling of the contours to level 0.
    """
    sx, sy = float(downsample_xy[0]), float(downsample_xy[1])
    binary = binary_mask(img_rgb, sthresh, mthresh, close, use_otsu, sthresh_up)
    scaled_ref_patch_area = int(ref_patch_size**2 / (sx * sy))
    a_t_px = a_t * scaled_ref_patch_area
    a_h_px = a_h * scaled_ref_patch_area

    params = dict(
        sthresh=sthresh, sthresh_up=sthresh_up, mthresh=mthresh, close=close,
        use_otsu=use_otsu, a_t=a_t, a_h=a_h, max_n_holes=max_n_holes,
        ref_patch_size=ref_patch_size, scaled_ref_patch_area=scaled_ref_patch_area,
    )  # fmt: skip
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or len(contours) == 0:
        return ClamSegmentation([], [], [], [], binary, (sx, sy), params)
    hierarchy = np.squeeze(hierarchy, axis=(0,))[:, 2:]
    fg, holes = filter_contours(contours, hierarchy, a_t_px, a_h_px, max_n_holes)

    # CLAM's keep_ids / exclude_ids selection (iteration over a set of small ints: ascending).
    if len(keep_ids) > 0:
        ids = set(int(i) for i in keep_ids) - set(int(i) for i in exclude_ids)
    else:
        ids = set(range(len(fg))) - set(int(i) for i in exclude_ids)
    fg = [fg[i] for i in ids]
    holes = [holes[i] for i in ids]

    scale = (sx, sy)
    return ClamSegmentation(
        contours_seg=fg,
        holes_seg=holes,
        contours_l0=scale_contours(fg, scale),
        holes_l0=scale_holes(holes, scale),
        binary=binary,
        downsample=scale,
        params=params,
    )


def tissue_mask(
    shape_hw: tuple[int, int],
    contours_seg: Sequence[np.ndarray],
    holes_seg: Sequence[Sequence[np.ndarray]],
) -> np.ndarray:
    """Filled contours (255) minus filled holes (0) at segmentation resolution, uint8."""
    mask = np.zeros(tuple(shape_hw[:2]), dtype=np.uint8)
    if len(contours_seg):
        cv2.drawContours(mask, list(contours_seg), -1, 255, thickness=cv2.FILLED)
    for holes in holes_seg:
        if len(holes):
            cv2.drawContours(mask, list(holes), -1, 0, thickness=cv2.FILLED)
    return mask


# --------------------------------------------------------------------------- patching


def _contour_checker(
    contour: np.ndarray, contour_fn: str, patch_size: int, center_shift: float = 0.5
) -> Callable[[int, int], bool]:
    """Return pt -> bool replicating isInContourV1/V2/V3_Easy/V3_Hard."""
    test = cv2.pointPolygonTest
    half = patch_size // 2
    if contour_fn == "basic":
        return lambda x, y: test(contour, (x, y), False) >= 0
    if contour_fn == "center":
        return lambda x, y: test(contour, (x + half, y + half), False) >= 0
    if contour_fn not in ("four_pt", "four_pt_hard"):
        raise NotImplementedError(contour_fn)
    shift = int(half * center_shift)
    if shift > 0:
        offsets = ((-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift))
    else:
        offsets = ((0, 0),)
    if contour_fn == "four_pt":

        def easy(x: int, y: int) -> bool:
            cx, cy = x + half, y + half
            return any(test(contour, (cx + dx, cy + dy), False) >= 0 for dx, dy in offsets)

        return easy

    def hard(x: int, y: int) -> bool:
        cx, cy = x + half, y + half
        return all(test(contour, (cx + dx, cy + dy), False) >= 0 for dx, dy in offsets)

    return hard


def _in_holes(holes: Sequence[np.ndarray], x: int, y: int, patch_size: int) -> bool:
    pt = (x + patch_size / 2, y + patch_size / 2)
    return any(cv2.pointPolygonTest(h, pt, False) > 0 for h in holes)


def patch_coords_for_contour(
    contour: np.ndarray,
    holes: Sequence[np.ndarray],
    level_dim0: tuple[int, int],
    patch_size: int = 256,
    step_size: int = 256,
    patch_downsample: tuple[int, int] = (1, 1),
    contour_fn: str = "four_pt",
    use_padding: bool = True,
    keep_single: bool = False,
) -> np.ndarray:
    """CLAM ``process_contour`` for one level-0 contour; returns (N, 2) int64 level-0 (x, y)."""
    start_x, start_y, w, h = cv2.boundingRect(contour)
    pdx, pdy = int(patch_downsample[0]), int(patch_downsample[1])
    ref_w, ref_h = patch_size * pdx, patch_size * pdy
    img_w, img_h = level_dim0
    if use_padding:
        stop_y = start_y + h
        stop_x = start_x + w
    else:
        stop_y = min(start_y + h, img_h - ref_h + 1)
        stop_x = min(start_x + w, img_w - ref_w + 1)

    check = _contour_checker(contour, contour_fn, ref_w)
    x_range = np.arange(start_x, stop_x, step=step_size * pdx)
    y_range = np.arange(start_y, stop_y, step=step_size * pdy)
    xs, ys = np.meshgrid(x_range, y_range, indexing="ij")
    candidates = np.array([xs.flatten(), ys.flatten()]).transpose()

    kept = [
        (x, y) for x, y in candidates.tolist() if check(x, y) and not _in_holes(holes, x, y, ref_w)
    ]
    # CLAM quirk: a contour's coordinates are written only if it produced more than one patch.
    if len(kept) > 1 or (keep_single and len(kept) == 1):
        return np.asarray(kept, dtype=np.int64).reshape(-1, 2)
    return np.zeros((0, 2), dtype=np.int64)


def patch_coords(
    contours_l0: Sequence[np.ndarray],
    holes_l0: Sequence[Sequence[np.ndarray]],
    level_dim0: tuple[int, int],
    patch_size: int = 256,
    step_size: int = 256,
    patch_downsample: tuple[int, int] = (1, 1),
    contour_fn: str = "four_pt",
    use_padding: bool = True,
    keep_single: bool = False,
) -> np.ndarray:
    """CLAM ``process_contours``: concatenated per-contour coordinates, in contour order."""
    parts = [
        patch_coords_for_contour(
            c, holes_l0[i], level_dim0, patch_size, step_size, patch_downsample,
            contour_fn, use_padding, keep_single,
        )
        for i, c in enumerate(contours_l0)
        if c is not None
    ]  # fmt: skip
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- slide flow


def clam_level_downsamples(
    level_dimensions: Sequence[tuple[int, int]], level_downsamples: Sequence[float]
) -> list[tuple[float, float]]:
    """CLAM ``_assertLevelDownsamples``: per-axis (dim0 / dim) estimates."""
    w0, h0 = level_dimensions[0]
    out: list[tuple[float, float]] = []
    for ds, (w, h) in zip(level_downsamples, level_dimensions, strict=False):
        est = (w0 / float(w), h0 / float(h))
        out.append(est if est != (ds, ds) else (float(ds), float(ds)))
    return out


def _openslide_best_level(level_downsamples: Sequence[float], downsample: float) -> int:
    """OpenSlide's ``get_best_level_for_downsample`` (largest level with ds <= requested)."""
    if downsample < level_downsamples[0]:
        return 0
    for i in range(1, len(level_downsamples)):
        if downsample < level_downsamples[i]:
            return i - 1
    return len(level_downsamples) - 1


def clam_seg_level(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    openslide_best_level_fn: Callable[[float], int] | None = None,
) -> int:
    """create_patches_fp's ``seg_level=-1`` rule: 0 for one level, else best level for 64x."""
    if len(level_dimensions) == 1:
        return 0
    if openslide_best_level_fn is not None:
        return int(openslide_best_level_fn(64))
    return _openslide_best_level(level_downsamples, 64)


_SEG_KEYS = (
    "sthresh", "sthresh_up", "mthresh", "close", "use_otsu", "a_t", "a_h", "max_n_holes",
    "ref_patch_size", "keep_ids", "exclude_ids",
)  # fmt: skip
_PATCH_KEYS = ("patch_size", "step_size", "contour_fn", "use_padding", "keep_single")


def _split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(params) - set(_SEG_KEYS) - set(_PATCH_KEYS)
    if unknown:
        raise TypeError(f"unknown CLAM parameters: {sorted(unknown)}")
    seg = {k: v for k, v in params.items() if k in _SEG_KEYS}
    patch = {k: v for k, v in params.items() if k in _PATCH_KEYS}
    return seg, patch


def run_clam_openslide(
    path: str | Path, seg_level: int = -1, patch_level: int = 0, **params: Any
) -> tuple[ClamSegmentation, np.ndarray, dict[str, Any]]:
    """Whole CLAM ``create_patches_fp`` flow (seg + patch, no stitching) for a slide file.

    ``params``: segment_tissue keywords (sthresh, mthresh, close, use_otsu, a_t, a_h,
    max_n_holes, ref_patch_size, keep_ids, exclude_ids) and patch keywords (patch_size,
    step_size, contour_fn, use_padding, keep_single). Returns (segmentation, coords, info) where
    info holds seg_level, downsample, level dims, counts and the phase timings in seconds.
    """
    import openslide

    seg_kw, patch_kw = _split_params(params)
    t0 = time.perf_counter()
    with openslide.OpenSlide(str(path)) as wsi:
        dims = list(wsi.level_dimensions)
        est = clam_level_downsamples(dims, wsi.level_downsamples)
        if seg_level < 0:
            seg_level = clam_seg_level(
                dims, wsi.level_downsamples, wsi.get_best_level_for_downsample
            )
        img = np.array(wsi.read_region((0, 0), seg_level, dims[seg_level]))
    t1 = time.perf_counter()
    seg = segment_tissue(img, est[seg_level], **seg_kw)
    t2 = time.perf_counter()
    pds = (int(est[patch_level][0]), int(est[patch_level][1]))
    coords = patch_coords(seg.contours_l0, seg.holes_l0, dims[0], patch_downsample=pds, **patch_kw)
    t3 = time.perf_counter()
    info = _info(seg, coords, seg_level, dims, est[seg_level], t1 - t0, t2 - t1, t3 - t2)
    return seg, coords, info


def run_clam_image(
    img_rgb: np.ndarray, **params: Any
) -> tuple[ClamSegmentation, np.ndarray, dict[str, Any]]:
    """CLAM flow for a flat (single-level) image: downsample (1, 1), level 0 = the image."""
    seg_kw, patch_kw = _split_params(params)
    h, w = img_rgb.shape[:2]
    t1 = time.perf_counter()
    seg = segment_tissue(img_rgb, (1.0, 1.0), **seg_kw)
    t2 = time.perf_counter()
    coords = patch_coords(seg.contours_l0, seg.holes_l0, (w, h), **patch_kw)
    t3 = time.perf_counter()
    info = _info(seg, coords, 0, [(w, h)], (1.0, 1.0), 0.0, t2 - t1, t3 - t2)
    return seg, coords, info


def _info(
    seg: ClamSegmentation,
    coords: np.ndarray,
    seg_level: int,
    dims: Sequence[tuple[int, int]],
    downsample: tuple[float, float],
    t_read: float,
    t_segment: float,
    t_patch: float,
) -> dict[str, Any]:
    return {
        "seg_level": seg_level,
        "seg_dim": tuple(dims[seg_level]),
        "level_dim0": tuple(dims[0]),
        "downsample": downsample,
        "n_contours": seg.n_contours,
        "n_holes": seg.n_holes,
        "n_coords": len(coords),
        "t_read": t_read,
        "t_segment": t_segment,
        "t_patch": t_patch,
    }


def _main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - manual tool
    import argparse

    from PIL import Image

    ap = argparse.ArgumentParser(description="CLAM reference seg+patch")
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--a-t", type=float, nargs="+", default=[100.0])
    args = ap.parse_args(argv)
    print("file\ta_t\tseg_level\tcontours\tholes\tcoords\tread_s\tseg_s\tpatch_s")
    for p in args.paths:
        for a_t in args.a_t:
            if p.lower().endswith((".jpg", ".jpeg", ".png")):
                t0 = time.perf_counter()
                img = np.asarray(Image.open(p).convert("RGB"))
                t_read = time.perf_counter() - t0
                _, _, info = run_clam_image(img, a_t=a_t)
                info["t_read"] = t_read
            else:
                _, _, info = run_clam_openslide(p, a_t=a_t)
            print(
                f"{Path(p).name}\t{a_t:g}\t{info['seg_level']} {info['seg_dim']}\t"
                f"{info['n_contours']}\t{info['n_holes']}\t{info['n_coords']}\t"
                f"{info['t_read']:.3f}\t{info['t_segment']:.3f}\t{info['t_patch']:.3f}"
            )


if __name__ == "__main__":  # pragma: no cover
    _main()
