"""Overlay JPEG and mask PNG of ``pathflow tile``: decoded pixels against hand-computed
values, and the per-slide output order (the coordinate file appears last)."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest
from pathflow.grid import PatchGrid
from pathflow.outputs import overlay_jpeg, write_mask_png
from pathflow.tissue import TissueSegmentation
from PIL import Image

GRAY = 230


def square(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.int64)


def hand_case() -> tuple[np.ndarray, TissueSegmentation, PatchGrid]:
    """1800x900 gray thumbnail of an 18000x9000 slide (0.1 px per level-0 px): one tissue
    square (thumbnail 100..1500 x 100..800) with one hole (900..1200 x 300..600), and two
    400 px patches at level 0 (2000, 2000) and (2400, 2000) -> cells 200..239 and 240..279."""
    thumb = np.full((900, 1800, 3), GRAY, np.uint8)
    tissue = [square(1000, 1000, 15000, 8000)]
    holes = [[square(9000, 3000, 12000, 6000)]]
    mask = np.zeros((90, 180), np.uint8)
    seg = TissueSegmentation(
        mask=mask, binary=mask, tissue_seg=[], holes_seg=[], tissue=tissue, holes=holes,
        seg_level=0, scale=(100.0, 100.0), threshold=8,
    )  # fmt: skip
    coords = np.array([[2000, 2000], [2400, 2000]], dtype=np.int64)
    grid = PatchGrid(
        coords=coords, tissue_fraction=np.ones(2, np.float32), patch_size_level0=400,
        step_level0=400, read_level=0, read_size=400, patch=400, target_mpp=0.5,
    )  # fmt: skip
    return thumb, seg, grid


def decoded(data: bytes) -> np.ndarray:
    assert data[:2] == b"\xff\xd8"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_overlay_pixels_match_hand_values() -> None:
    thumb, seg, grid = hand_case()
    img = decoded(overlay_jpeg(thumb, (18000, 9000), seg, grid, quality=95))
    assert img.shape == (900, 1800, 3)
    # Cell interior: gray blended with the fill (255, 220, 0, alpha 40):
    # R = (230*215 + 255*40 + 127) // 255 = 234, G = 228, B = (230*215 + 127) // 255 = 194.
    interior = img[205:235, 205:235].reshape(-1, 3).mean(axis=0)
    assert interior == pytest.approx([234, 228, 194], abs=3)
    # Shared outline of the two cells (x = 239, 240), alpha 160: B = (230*95 + 127) // 255 = 86.
    assert img[210:230, 239:241, 2].mean() < interior[2] - 40
    # Outside tissue and inside the hole: untouched.
    assert img[40:60, 40:60].reshape(-1, 3).mean(axis=0) == pytest.approx([GRAY] * 3, abs=2)
    assert img[440:460, 1040:1060].reshape(-1, 3).mean(axis=0) == pytest.approx([GRAY] * 3, abs=2)
    # Tissue contour (green (0, 200, 0), 3 px wide since 1800 / 600 = 3) and hole (blue).
    r, g, b = img[100, 700:900].T
    assert (g - r).min() > 120 and (g - b).min() > 120
    r, g, b = img[300:600, 1200].T
    assert (b - r).min() > 120 and (b - g).min() > 60
    # Only the two cells and the contours changed the picture.
    changed = np.abs(img - GRAY).max(axis=2) > 12
    assert not changed[:96].any() and not changed[808:].any() and not changed[:, 1504:].any()


def test_overlay_of_many_patches_and_tiny_cells() -> None:
    """A full 64 x 32 grid of 5 px cells (every cell tinted, no gaps) and 1 px cells (solid)."""
    thumb = np.full((160, 320, 3), GRAY, np.uint8)
    ys, xs = np.mgrid[0:32, 0:64]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * 50
    grid = PatchGrid(coords, np.ones(len(coords), np.float32), 50, 50, 0, 50, 50, 0.5)
    seg = TissueSegmentation(
        mask=np.zeros((1, 1), np.uint8), binary=np.zeros((1, 1), np.uint8), tissue_seg=[],
        holes_seg=[], tissue=[], holes=[], seg_level=0, scale=(1.0, 1.0), threshold=0,
    )  # fmt: skip
    img = decoded(overlay_jpeg(thumb, (3200, 1600), seg, grid, quality=95))
    assert (img[:, :, 2] < GRAY - 20).all()  # every pixel is in a cell
    small = PatchGrid(coords[:1] + 800, np.ones(1, np.float32), 5, 5, 0, 5, 5, 0.5)
    img = decoded(overlay_jpeg(thumb, (3200, 1600), seg, small, quality=95))
    assert img[80, 80, 2] < GRAY - 40  # a 0.5 px cell still shows as one outline pixel


def test_mask_png_round_trips(tmp_path: Path) -> None:
    mask = np.zeros((371, 278), np.uint8)
    mask[50:200, 30:100] = 255
    write_mask_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "L"
        assert np.array_equal(np.asarray(im), mask)
    assert not list(tmp_path.glob(".*.tmp"))


def test_tile_overlay_of_a_real_slide(tmp_path: Path, cmu_path: Path) -> None:
    """End to end: the overlay is the 2048 px thumbnail with the patch cells tinted."""
    from pathflow.cli import main
    from pathflow.slide import open_slide

    out = tmp_path / "out"
    assert main(["tile", str(cmu_path), "--out", str(out), "-q", "--workers", "1"]) == 0
    sid = cmu_path.stem
    with h5py.File(out / f"coords/{sid}.h5") as f:
        coords = f["coords"][:]
        side0 = int(f["coords"].attrs["patch_size_level0"])
    with open_slide(cmu_path) as s:
        thumb = np.asarray(s.thumbnail(2048)).astype(int)
        w0 = s.dimensions[0]
    over = decoded((out / f"overlays/{sid}.jpg").read_bytes())
    assert over.shape == thumb.shape == (2048, 1532, 3)
    fx = thumb.shape[1] / w0
    x, y = (int(v * fx) for v in coords[0])
    c = round(side0 * fx) // 2
    inner = (slice(y + c - 20, y + c + 20), slice(x + c - 20, x + c + 20))
    # inside the first cell: the thumbnail blended with the fill (255, 220, 0) at alpha 40
    want = (thumb[inner] * 215 + np.array([255, 220, 0]) * 40) / 255
    assert over[inner].mean(axis=(0, 1)) == pytest.approx(want.mean(axis=(0, 1)), abs=6)
    assert over[inner][..., 2].mean() < thumb[inner][..., 2].mean() - 15
    # a green contour pixel somewhere on the picture
    g = over[..., 1] - np.maximum(over[..., 0], over[..., 2])
    assert (g > 100).sum() > 500


def test_failed_background_write_leaves_no_coords(tmp_path: Path, cmu_path: Path) -> None:
    """The mask is written in the background; when it fails the slide fails and its
    coordinate file (the mark of a finished slide) is not written."""
    from pathflow.tiling.config import TileConfig
    from pathflow.tiling.slide_task import process_slide

    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder should be")
    cfg = TileConfig(inputs=[str(cmu_path)], out=str(out)).resolve()
    row = process_slide(cmu_path, "cmu", cfg)
    assert row["status"] == "failed" and "masks" in row["error"]
    assert not (out / "coords" / "cmu.h5").exists()
    assert not list(out.rglob("*.h5")) and not list(out.rglob(".*.tmp"))
