"""Tissue segmentation of a slide: seg-level image -> binary mask -> contours with holes.

The pixel work runs in Rust (``pathflow._core``); this module picks the level to segment,
converts area limits into pixels, and packages the result.

Two families of presets:

* ``clam`` / ``tcga``: CLAM's ``create_patches_fp.py`` exactly. The level nearest 64x
  downsample (level 0 for single-level images), area limits ``a_t``/``a_h`` counted in
  512x512 level-0 patches (CLAM's default 100/16, its ``tcga`` preset 16/4).
* ``pathflow`` (default): the mask is computed at ``seg_mpp`` microns per pixel (4 um/px),
  whatever the scan magnification, and area limits are in mm² of tissue, so they mean the
  same at 20x and 40x and small biopsies survive.

Example:
    >>> from pathflow.slide import open_slide
    >>> from pathflow.tissue import TissueParams, segment_tissue
    >>> with open_slide("slide.svs") as s:                          # doctest: +SKIP
    ...     seg = segment_tissue(s, TissueParams.preset("clam"), mpp=s.mpp)
    >>> len(seg.tissue), seg.mask.shape                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow import _core
from pathflow.exceptions import InvalidArgumentError, MaskError
from pathflow.slide.base import SlideReader

Contours = list[npt.NDArray[np.int64]]

AREA_UNITS = ("mm2", "patch512")

PRESETS: dict[str, dict[str, Any]] = {
    "pathflow": {"seg_level": -1, "seg_mpp": 4.0, "area_unit": "mm2", "a_t": 0.02, "a_h": 0.005},
    "clam": {"seg_level": -1, "seg_mpp": None, "area_unit": "patch512", "a_t": 100.0, "a_h": 16.0},
    "tcga": {"seg_level": -1, "seg_mpp": None, "area_unit": "patch512", "a_t": 16.0, "a_h": 4.0},
}


@dataclass
class TissueParams:
    """How to find tissue. Field names follow CLAM's ``seg_params``/``filter_params``.

    Attributes:
        preset: ``pathflow``, ``clam`` or ``tcga`` (see module docstring).
        seg_level: Pyramid level to segment; ``-1`` picks it (CLAM: nearest 64x downsample;
            pathflow: the level at or below ``seg_mpp``, then area-downsampled to it).
        seg_mpp: Target mask resolution in um/px for ``seg_level=-1`` (``None``: CLAM's rule).
        sthresh: Saturation threshold (tissue where blurred S > sthresh).
        mthresh: Median blur kernel (odd).
        close: Morphological closing kernel (0 = off).
        otsu: Use Otsu's threshold instead of ``sthresh``.
        a_t: Minimum tissue area of a region, net of its holes (unit: ``area_unit``).
        a_h: Minimum hole area (unit: ``area_unit``).
        max_holes: Largest holes kept per region.
        area_unit: ``mm2`` or ``patch512`` (512x512 level-0 patches, as CLAM counts).
        ref_patch_size: Reference patch side for ``patch512`` areas.
        remove_ink: Exclude blue/green/black pen marker from tissue.
    """

    preset: str = "pathflow"
    seg_level: int = -1
    seg_mpp: float | None = 4.0
    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    otsu: bool = False
    a_t: float = 0.02
    a_h: float = 0.005
    max_holes: int = 8
    area_unit: str = "mm2"
    ref_patch_size: int = 512
    remove_ink: bool = False

    @classmethod
    def preset_defaults(cls, name: str) -> TissueParams:
        """Parameters of a named preset."""
        if name not in PRESETS:
            raise InvalidArgumentError(
                f"unknown preset {name!r} (expected one of {', '.join(PRESETS)})"
            )
        return cls(preset=name, **PRESETS[name])

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` for values out of range."""
        if self.mthresh < 1 or self.mthresh % 2 == 0:
            raise InvalidArgumentError(f"mthresh must be an odd number >= 1, got {self.mthresh}")
        if not 0 <= self.sthresh <= 255:
            raise InvalidArgumentError(f"sthresh must be in 0..255, got {self.sthresh}")
        if not 0 <= self.close <= 255:
            raise InvalidArgumentError(f"close must be in 0..255, got {self.close}")
        if self.area_unit not in AREA_UNITS:
            raise InvalidArgumentError(
                f"area_unit must be one of {AREA_UNITS}, got {self.area_unit!r}"
            )
        if self.a_t < 0 or self.a_h < 0 or self.max_holes < 0:
            raise InvalidArgumentError("a_t, a_h and max_holes must be >= 0")
        if self.seg_mpp is not None and self.seg_mpp <= 0:
            raise InvalidArgumentError(f"seg_mpp must be > 0, got {self.seg_mpp}")


@dataclass
class TissueSegmentation:
    """Result of :func:`segment_tissue`.

    Attributes:
        mask: Filled tissue mask (uint8 0/255) at segmentation resolution.
        binary: Thresholded, closed image before contour filtering.
        tissue_seg, holes_seg: Kept contours at segmentation resolution.
        tissue, holes: The same, scaled to level 0 like CLAM (``int(p * scale)``).
        seg_level: Pyramid level that was read.
        scale: Level-0 pixels per mask pixel ``(sx, sy)``.
        threshold: Saturation threshold applied (``sthresh`` or Otsu's level).
        ink: Ink mask at segmentation resolution when ink removal was on.
        source: ``"segmentation"``, ``"png"`` or ``"geojson"``.
    """

    mask: npt.NDArray[np.uint8]
    binary: npt.NDArray[np.uint8]
    tissue_seg: Contours
    holes_seg: list[Contours]
    tissue: Contours
    holes: list[Contours]
    seg_level: int
    scale: tuple[float, float]
    threshold: int
    ink: npt.NDArray[np.uint8] | None = None
    source: str = "segmentation"
    min_area_px: float = 0.0
    min_hole_area_px: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def tissue_area_mm2(self, mpp: float) -> float:
        """Area of the filled mask in mm²."""
        px = float(np.count_nonzero(self.mask))
        return px * self.scale[0] * self.scale[1] * (mpp / 1000.0) ** 2


def _area_to_px(
    value: float, params: TissueParams, scale: tuple[float, float], mpp: float | None
) -> float:
    if params.area_unit == "patch512":
        # CLAM: int(ref_patch_size**2 / (scale[0] * scale[1])) seg pixels per ref patch.
        return value * int(params.ref_patch_size**2 / (scale[0] * scale[1]))
    if mpp is None:
        raise InvalidArgumentError("area limits in mm² need the slide's mpp")
    level0_px_per_mm2 = 1e6 / (mpp * mpp)
    return value * level0_px_per_mm2 / (scale[0] * scale[1])


def choose_seg_level(
    slide: SlideReader, params: TissueParams, mpp: float | None
) -> tuple[int, int]:
    """Level to read and the extra integer area-downsample factor to apply to it."""
    if params.seg_level >= 0:
        if params.seg_level >= slide.level_count:
            raise InvalidArgumentError(
                f"{slide.path}: seg_level {params.seg_level} but the slide has "
                f"{slide.level_count} level(s)"
            )
        return params.seg_level, 1
    if params.seg_mpp is None or mpp is None:
        # CLAM create_patches_fp: level 0 for single-level files, else best level for 64x.
        if slide.level_count == 1:
            return 0, 1
        return slide.get_best_level_for_downsample(64), 1
    want = params.seg_mpp / mpp  # wanted downsample from level 0
    level = slide.get_best_level_for_downsample(want * 1.01)
    have = slide.level_downsamples[level]
    factor = max(1, math.floor(want / have + 1e-6))
    return level, factor


def segment_tissue(
    slide: SlideReader,
    params: TissueParams,
    mpp: float | None,
    levels: dict[int, npt.NDArray[np.uint8]] | None = None,
) -> TissueSegmentation:
    """Find tissue regions of ``slide`` (see :class:`TissueParams`).

    ``levels``: optional per-slide cache of whole levels (level -> RGB pixels); the level read
    here is taken from it or stored in it, so a later user (the overlay thumbnail) of the same
    level does not read it again.
    """
    params.validate()
    level, factor = choose_seg_level(slide, params, mpp)
    w, h = slide.level_dimensions[level]
    if w * h > 4e8:
        raise InvalidArgumentError(
            f"{slide.path}: level {level} is {w}x{h}, too large to segment; "
            "set seg_level or seg_mpp"
        )
    img = levels.get(level) if levels is not None else None
    if img is None:
        img = slide.read_level(level)
        if levels is not None:
            levels[level] = img
    if factor > 1:
        img = _core.downsample_area(img, factor)
    mh, mw = img.shape[:2]
    dim0 = slide.dimensions
    scale = slide.level_downsample_xy(level) if factor == 1 else (dim0[0] / mw, dim0[1] / mh)
    seg = segment_image(img, scale, params, mpp)
    seg.seg_level = level
    seg.info = {"seg_level": level, "seg_factor": factor, "seg_shape": [mh, mw]}
    return seg


def segment_image(
    img: npt.NDArray[np.uint8],
    scale: tuple[float, float],
    params: TissueParams,
    mpp: float | None = None,
) -> TissueSegmentation:
    """Segment an RGB(A) image whose pixels are ``scale`` level-0 pixels wide and high.

    This is :func:`segment_tissue` without the slide: useful when the pixels are already in
    memory (``mpp`` is only needed for areas in mm²).
    """
    params.validate()
    binary, threshold, ink = _core.binary_tissue(
        img,
        sthresh=params.sthresh,
        mthresh=params.mthresh,
        close=params.close,
        otsu=params.otsu,
        remove_ink=params.remove_ink,
    )
    seg = _regions_from_binary(binary, params, scale, mpp)
    seg.threshold = int(threshold)
    seg.ink = ink
    return seg


def _regions_from_binary(
    binary: npt.NDArray[np.uint8],
    params: TissueParams,
    scale: tuple[float, float],
    mpp: float | None,
) -> TissueSegmentation:
    min_area = _area_to_px(params.a_t, params, scale, mpp)
    min_hole = _area_to_px(params.a_h, params, scale, mpp)
    tissue, holes = _core.segment_contours(binary, min_area, min_hole, params.max_holes)
    t0, h0 = _core.scale_regions(tissue, holes, scale[0], scale[1])
    mh, mw = binary.shape
    mask = _core.rasterize(tissue, holes, mw, mh)
    return TissueSegmentation(
        mask=mask,
        binary=binary,
        tissue_seg=tissue,
        holes_seg=holes,
        tissue=t0,
        holes=h0,
        seg_level=0,
        scale=(float(scale[0]), float(scale[1])),
        threshold=0,
        min_area_px=min_area,
        min_hole_area_px=min_hole,
    )


# --------------------------------------------------------------------------------------
# Bring-your-own masks


def mask_from_png(
    path: str | os.PathLike[str],
    slide: SlideReader,
    params: TissueParams,
    mpp: float | None,
) -> TissueSegmentation:
    """Tissue regions from a mask picture (non-zero = tissue) covering the whole slide.

    The picture may have any resolution with the slide's aspect ratio (within 2%); its
    contours go through the same area filter as a computed mask.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: mask file not found")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L"))
    except Exception as exc:
        raise MaskError(f"{p}: cannot read mask picture ({exc})") from exc
    mh, mw = arr.shape
    w0, h0 = slide.dimensions
    if abs(mw / mh - w0 / h0) > 0.02 * (w0 / h0):
        raise MaskError(
            f"{p}: mask is {mw}x{mh} but slide {slide.path.name} is {w0}x{h0} (aspect differs)"
        )
    binary = np.where(arr > 0, 255, 0).astype(np.uint8)
    seg = _regions_from_binary(binary, params, (w0 / mw, h0 / mh), mpp)
    seg.source = "png"
    seg.info = {"mask_file": str(p), "seg_shape": [mh, mw]}
    return seg


def mask_from_geojson(
    path: str | os.PathLike[str],
    slide: SlideReader,
    mask_mpp: float = 4.0,
    mpp: float | None = None,
) -> TissueSegmentation:
    """Tissue regions from GeoJSON polygons in level-0 pixel coordinates (QuPath export).

    ``Polygon`` and ``MultiPolygon`` geometries are used as given: exterior rings are tissue,
    interior rings holes; no area filter is applied. A mask for tissue fractions is
    rasterised at ``mask_mpp`` um/px (or 1/16 of level 0 when the mpp is unknown).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: mask file not found")
    try:
        doc = json.loads(p.read_text())
    except Exception as exc:
        raise MaskError(f"{p}: not valid JSON ({exc})") from exc
    polygons: list[Any] = []
    for geom in _geometries(doc):
        kind = geom.get("type")
        coords = geom.get("coordinates") or []
        if kind == "Polygon":
            polygons.append(coords)
        elif kind == "MultiPolygon":
            polygons.extend(coords)
    if not polygons:
        raise MaskError(f"{p}: no Polygon or MultiPolygon geometry found")
    tissue: Contours = []
    holes: list[Contours] = []
    for rings in polygons:
        try:
            arrs = [np.asarray(r, dtype=np.float64)[:, :2].round().astype(np.int64) for r in rings]
        except Exception as exc:
            raise MaskError(f"{p}: malformed polygon coordinates ({exc})") from exc
        arrs = [a[:-1] if len(a) > 1 and (a[0] == a[-1]).all() else a for a in arrs]
        if len(arrs[0]) < 3:
            continue
        tissue.append(np.ascontiguousarray(arrs[0]))
        holes.append([np.ascontiguousarray(a) for a in arrs[1:] if len(a) >= 3])
    w0, h0 = slide.dimensions
    factor = (mask_mpp / mpp) if mpp else 16.0
    mw, mh = max(1, round(w0 / factor)), max(1, round(h0 / factor))
    sx, sy = w0 / mw, h0 / mh
    ts = [np.ascontiguousarray((c / [sx, sy]).astype(np.int64)) for c in tissue]
    hs = [[np.ascontiguousarray((c / [sx, sy]).astype(np.int64)) for c in hl] for hl in holes]
    mask = _core.rasterize(ts, hs, mw, mh)
    return TissueSegmentation(
        mask=mask,
        binary=mask.copy(),
        tissue_seg=ts,
        holes_seg=hs,
        tissue=tissue,
        holes=holes,
        seg_level=-1,
        scale=(sx, sy),
        threshold=0,
        source="geojson",
        info={"mask_file": str(p)},
    )


def resample_mask(mask: npt.NDArray[np.uint8], shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """A whole-slide mask resampled (nearest neighbour) to ``shape`` (rows, columns)."""
    if mask.shape[:2] == tuple(shape):
        return mask
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1)
    return np.ascontiguousarray(mask[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]])


def intersect_masks(detected: TissueSegmentation, drawn: TissueSegmentation) -> TissueSegmentation:
    """``--mask-mode intersect``: the detected tissue inside a drawn mask (PNG or GeoJSON).

    The result keeps the detector's contours, level and scale; its ``mask`` (written as
    ``masks/<slide>.png``, used for areas and tissue fractions) is the detector's mask AND the
    drawn one resampled to it; ``source`` is e.g. ``"segmentation&geojson"``.
    """
    inside = resample_mask(drawn.mask, detected.mask.shape[:2]) > 0
    mask = np.where(inside, detected.mask, 0).astype(np.uint8)
    info = {**detected.info, **{k: v for k, v in drawn.info.items() if k == "mask_file"}}
    return dataclasses.replace(
        detected, mask=mask, source=f"{detected.source}&{drawn.source}", info=info
    )


def _geometries(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        return [g for d in doc for g in _geometries(d)]
    if not isinstance(doc, dict):
        return []
    kind = doc.get("type")
    if kind == "FeatureCollection":
        return [g for f in doc.get("features", []) for g in _geometries(f)]
    if kind == "Feature":
        return _geometries(doc.get("geometry") or {})
    if kind == "GeometryCollection":
        return [g for d in doc.get("geometries", []) for g in _geometries(d)]
    if kind in ("Polygon", "MultiPolygon"):
        return [doc]
    return []


def params_dict(params: TissueParams) -> dict[str, Any]:
    """Plain dict of the parameters (for saving beside outputs)."""
    return dataclasses.asdict(params)
