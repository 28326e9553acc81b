"""Patch coordinate grids at a physical resolution.

A patch of ``patch`` pixels at ``mpp`` microns per pixel covers
``round(patch * mpp / slide_mpp)`` level-0 pixels; it is read from the coarsest pyramid level
that is still at least as fine as ``mpp`` (``read_size`` pixels there) and resampled to
``patch`` pixels. Coordinates are level-0 top-left corners.

Two grid layouts:

* ``slide`` (pathflow preset): one grid anchored at the slide origin, so patches line up
  with the slide's native tiles; each patch is tested against every tissue region.
* ``clam`` (clam/tcga presets): CLAM's grid per tissue contour, anchored at the contour's
  bounding box, in CLAM's order (may repeat a patch where two contours' boxes overlap).

Per-patch test: CLAM's ``four_pt`` rule (default; also ``four_pt_hard``, ``center``,
``basic``) with the centre outside the region's holes, or ``min_tissue``: the fraction of
the patch footprint covered by the tissue mask.

Example:
    >>> from pathflow.grid import GridParams, patch_grid
    >>> params = GridParams(patch=256, mpp=0.5)
    >>> grid = patch_grid(slide, seg, params, slide_mpp=0.25)  # doctest: +SKIP
    >>> grid.coords.shape, grid.read_level, grid.read_size      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pathflow import _core
from pathflow.exceptions import InvalidArgumentError
from pathflow.slide.base import SlideReader
from pathflow.tissue import TissueSegmentation

CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")
LAYOUTS = ("slide", "clam")


@dataclass
class GridParams:
    """How to lay patches on tissue.

    Attributes:
        patch: Output patch side in pixels.
        mpp: Target microns per pixel; ``None`` = the slide's level 0 (CLAM's behaviour).
        overlap: Overlap between neighbouring patches in output pixels.
        contour_fn: ``four_pt`` (default), ``four_pt_hard``, ``center`` or ``basic``.
        min_tissue: If set, keep patches whose tissue fraction is >= this (0-1) instead of
            the contour test (slide layout only).
        layout: ``slide`` or ``clam``.
        use_padding: Allow patches that extend past the slide edge (CLAM default True).
    """

    patch: int = 256
    mpp: float | None = 0.5
    overlap: int = 0
    contour_fn: str = "four_pt"
    min_tissue: float | None = None
    layout: str = "slide"
    use_padding: bool = False

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` for inconsistent values."""
        if self.patch <= 0:
            raise InvalidArgumentError(f"patch must be > 0, got {self.patch}")
        if not 0 <= self.overlap < self.patch:
            raise InvalidArgumentError(
                f"overlap must be in [0, patch), got {self.overlap} for patch {self.patch}"
            )
        if self.mpp is not None and not 0.05 <= self.mpp <= 100:
            raise InvalidArgumentError(f"target mpp must be in 0.05..100, got {self.mpp}")
        if self.contour_fn not in CONTOUR_FNS:
            raise InvalidArgumentError(
                f"contour_fn must be one of {', '.join(CONTOUR_FNS)}, got {self.contour_fn!r}"
            )
        if self.layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout must be slide or clam, got {self.layout!r}")
        if self.min_tissue is not None:
            if not 0.0 <= self.min_tissue <= 1.0:
                raise InvalidArgumentError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
            if self.layout != "slide":
                raise InvalidArgumentError("min_tissue needs the slide layout")


@dataclass
class PatchGrid:
    """Patch coordinates of one slide.

    Attributes:
        coords: (N, 2) int64 level-0 top-left corners.
        tissue_fraction: (N,) float32 fraction of each footprint covered by tissue.
        patch_size_level0: Footprint side in level-0 pixels.
        step_level0: Grid step in level-0 pixels.
        read_level: Pyramid level to read patches from.
        read_size: Patch side at ``read_level`` (CLAM's ``patch_size`` attribute).
        patch: Output patch side; target_mpp: output resolution (um/px).
    """

    coords: npt.NDArray[np.int64]
    tissue_fraction: npt.NDArray[np.float32]
    patch_size_level0: int
    step_level0: int
    read_level: int
    read_size: int
    patch: int
    target_mpp: float

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def plan_read(slide: SlideReader, target_over_slide: float) -> int:
    """Coarsest level whose downsample does not exceed the wanted one (1% tolerance)."""
    best = 0
    for level, ds in enumerate(slide.level_downsamples):
        if ds <= target_over_slide * 1.01 and ds >= slide.level_downsamples[best]:
            best = level
    return best


def patch_grid(
    slide: SlideReader,
    seg: TissueSegmentation,
    params: GridParams,
    slide_mpp: float,
) -> PatchGrid:
    """Coordinates of every patch that holds tissue (see module docstring)."""
    params.validate()
    target = params.mpp if params.mpp is not None else slide_mpp
    ratio = target / slide_mpp
    patch0 = max(1, round(params.patch * ratio))
    step0 = max(1, round((params.patch - params.overlap) * ratio))
    level = plan_read(slide, ratio)
    ds = slide.level_downsamples[level]
    read_size = max(1, round(patch0 / ds))
    coords, fractions = grid_coords(seg, slide.dimensions, patch0, step0, params)
    return PatchGrid(
        coords=np.ascontiguousarray(coords, dtype=np.int64),
        tissue_fraction=np.ascontiguousarray(fractions, dtype=np.float32),
        patch_size_level0=patch0,
        step_level0=step0,
        read_level=level,
        read_size=read_size,
        patch=params.patch,
        target_mpp=float(target),
    )


def grid_coords(
    seg: TissueSegmentation,
    level0_size: tuple[int, int],
    patch0: int,
    step0: int,
    params: GridParams,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Coordinates and tissue fractions for level-0 patch side ``patch0`` and ``step0``."""
    w0, h0 = level0_size
    if params.min_tissue is not None:
        cand = _core.full_grid(w0, h0, patch0, step0, params.use_padding)
        frac = _core.tissue_fractions(cand, patch0, seg.mask, seg.scale[0], seg.scale[1])
        keep = frac > 0.0 if params.min_tissue == 0.0 else frac >= params.min_tissue
        return cand[keep], frac[keep]
    fn = _core.clam_grid if params.layout == "clam" else _core.slide_grid
    coords = fn(
        seg.tissue,
        seg.holes,
        w0,
        h0,
        patch0,
        step0,
        use_padding=params.use_padding,
        contour_fn=params.contour_fn,
    )
    fractions = _core.tissue_fractions(coords, patch0, seg.mask, seg.scale[0], seg.scale[1])
    return coords, fractions


def intersect_grid(
    slide: SlideReader,
    detected: TissueSegmentation,
    drawn: TissueSegmentation,
    params: GridParams,
    slide_mpp: float,
) -> PatchGrid:
    """``--mask-mode intersect``: the patches of the detected tissue that a drawn mask keeps.

    * ``min_tissue``: the fraction of each footprint covered by detected AND drawn tissue
      (``detected.mask`` must already be that intersection, see
      :func:`pathflow.tissue.intersect_masks`);
    * ``slide`` layout: the patches that pass the contour test of both (both grids are
      anchored at the slide origin, so a patch of one is a patch of the other);
    * ``clam`` layout (grids anchored per contour): the detector's patches whose centre lies
      inside the drawn mask.
    """
    grid = patch_grid(slide, detected, params, slide_mpp)
    if params.min_tissue is not None or not len(grid):
        return grid
    if params.layout == "slide":
        other = patch_grid(slide, drawn, params, slide_mpp).coords
        keep = np.isin(_key(grid.coords), _key(other))
    else:
        half = grid.patch_size_level0 / 2.0
        mh, mw = drawn.mask.shape[:2]
        cx = ((grid.coords[:, 0] + half) / drawn.scale[0]).astype(np.int64).clip(0, mw - 1)
        cy = ((grid.coords[:, 1] + half) / drawn.scale[1]).astype(np.int64).clip(0, mh - 1)
        keep = drawn.mask[cy, cx] > 0
    return dataclasses.replace(
        grid,
        coords=np.ascontiguousarray(grid.coords[keep]),
        tissue_fraction=np.ascontiguousarray(grid.tissue_fraction[keep]),
    )


def _key(coords: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """One int64 per (x, y) level-0 corner (x, y < 2**31)."""
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return (c[:, 1] << 32) | (c[:, 0] & 0xFFFFFFFF)
