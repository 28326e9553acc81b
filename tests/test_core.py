"""The Rust core against OpenCV, call by call, on real slide pixels (bit-exact)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import cv2
import numpy as np
import pathflow
import pytest
from pathflow import _core
from pathflow.exceptions import InvalidArgumentError


def test_saturation_is_opencv_exact_on_every_colour() -> None:
    cube = (
        np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij"), -1)
        .reshape(4096, 4096, 3)
        .astype(np.uint8)
    )
    ref = cv2.cvtColor(cube, cv2.COLOR_RGB2HSV)[:, :, 1]
    assert np.array_equal(_core.saturation(cube), ref)


def test_saturation_ignores_alpha(cmu_rgb: np.ndarray) -> None:
    rgba = np.dstack([cmu_rgb, np.full(cmu_rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(_core.saturation(rgba), _core.saturation(cmu_rgb))


@pytest.mark.parametrize("ksize", [3, 5, 7])
def test_median_blur_matches_opencv(cmu_rgb: np.ndarray, ksize: int) -> None:
    sat = cv2.cvtColor(cmu_rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    assert np.array_equal(_core.median_blur(sat, ksize), cv2.medianBlur(sat, ksize))


def test_otsu_matches_opencv(cmu_rgb: np.ndarray, tma_path: Path) -> None:
    from PIL import Image

    for rgb in (cmu_rgb, np.asarray(Image.open(tma_path).convert("RGB"))):
        med = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1], 7)
        t, _ = cv2.threshold(med, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
        assert _core.otsu_threshold(med) == int(t)


@pytest.mark.parametrize("ksize", [2, 3, 4, 5, 8])
def test_closing_matches_opencv(cmu_rgb: np.ndarray, ksize: int) -> None:
    sat = cv2.cvtColor(cmu_rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    _, b = cv2.threshold(sat, 20, 255, cv2.THRESH_BINARY)
    ref = cv2.morphologyEx(b, cv2.MORPH_CLOSE, np.ones((ksize, ksize), np.uint8))
    assert np.array_equal(_core.morph_close(b, ksize), ref)


@pytest.mark.parametrize(("sthresh", "mthresh", "close", "otsu"), [
    (8, 7, 4, False), (20, 7, 0, False), (8, 5, 2, False), (0, 7, 4, True),
])  # fmt: skip
def test_binary_tissue_is_clam_exact(
    cmu_rgb: np.ndarray, sthresh: int, mthresh: int, close: int, otsu: bool
) -> None:
    med = cv2.medianBlur(cv2.cvtColor(cmu_rgb, cv2.COLOR_RGB2HSV)[:, :, 1], mthresh)
    flag = cv2.THRESH_OTSU + cv2.THRESH_BINARY if otsu else cv2.THRESH_BINARY
    t, ref = cv2.threshold(med, sthresh, 255, flag)
    if close:
        ref = cv2.morphologyEx(ref, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    got, used, ink = _core.binary_tissue(
        cmu_rgb, sthresh=sthresh, mthresh=mthresh, close=close, otsu=otsu
    )
    assert used == int(t)
    assert ink is None
    assert np.array_equal(got, ref)


def test_contours_match_opencv_ccomp(cmu_rgb: np.ndarray) -> None:
    binary, _, _ = _core.binary_tissue(cmu_rgb)
    ref, hier = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    got = _core.find_contours(binary)
    assert len(got) == len(ref) > 100
    ref_set = sorted(
        (cv2.contourArea(c), int(hier[0][i][3]) != -1, len(c)) for i, c in enumerate(ref)
    )
    got_set = sorted((_core.contour_area(p), is_hole, len(p)) for p, is_hole, _ in got)
    assert got_set == ref_set
    # Same point sets, region by region.
    ref_pts = sorted(tuple(sorted(map(tuple, c.reshape(-1, 2).tolist()))) for c in ref)
    got_pts = sorted(tuple(sorted(map(tuple, p.tolist()))) for p, _, _ in got)
    assert got_pts == ref_pts
    # Every hole's parent is an outer contour.
    assert all((par >= 0) == h for _, h, par in got)
    assert all(not got[par][1] for _, h, par in got if h)


def test_point_polygon_test_matches_opencv(cmu_rgb: np.ndarray) -> None:
    binary, _, _ = _core.binary_tissue(cmu_rgb)
    contours = sorted(_core.find_contours(binary), key=lambda c: -len(c[0]))[:3]
    rng = np.random.default_rng(0)
    for pts, _, _ in contours:
        cv_pts = pts.astype(np.int32).reshape(-1, 1, 2)
        x0, y0 = pts.min(0) - 3
        x1, y1 = pts.max(0) + 3
        samples = np.column_stack([rng.integers(x0, x1, 400), rng.integers(y0, y1, 400)])
        samples = np.vstack([samples, pts[::7]])  # boundary points too
        for x, y in samples.tolist():
            want = int(cv2.pointPolygonTest(cv_pts, (float(x), float(y)), False))
            assert _core.point_polygon_test(pts, x, y) == want, (x, y)


def test_rasterize_matches_draw_contours(cmu_rgb: np.ndarray) -> None:
    binary, _, _ = _core.binary_tissue(cmu_rgb)
    tissue, holes = _core.segment_contours(binary, 1000.0, 50.0, 8)
    h, w = binary.shape
    got = _core.rasterize(tissue, holes, w, h)
    ref = np.zeros((h, w), np.uint8)
    cv2.drawContours(ref, [t.astype(np.int32) for t in tissue], -1, 255, cv2.FILLED)
    cv2.drawContours(ref, [c.astype(np.int32) for hs in holes for c in hs], -1, 0, cv2.FILLED)
    inter = np.logical_and(got > 0, ref > 0).sum()
    union = np.logical_or(got > 0, ref > 0).sum()
    assert inter / union > 0.999


def test_tissue_fraction_is_exact_area() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 255
    coords = np.array([[0, 0], [10, 0], [15, 5], [20, 0]], np.int64)
    got = _core.tissue_fractions(coords, 20, mask, 10.0, 10.0)
    assert got.tolist() == [1.0, 0.5, 0.25, 0.0]


def test_errors_map_to_pathflow_exceptions() -> None:
    with pytest.raises(InvalidArgumentError, match="odd"):
        _core.median_blur(np.zeros((4, 4), np.uint8), 4)
    with pytest.raises(InvalidArgumentError, match="channels"):
        _core.saturation(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidArgumentError, match="contour_fn"):
        _core.slide_grid([], [], 10, 10, 2, 2, contour_fn="nope")
    with pytest.raises(ValueError):  # InvalidArgumentError is also a ValueError
        _core.set_num_threads(0)


def test_thread_pool_size_is_configurable() -> None:
    before = _core.num_threads()
    try:
        _core.set_num_threads(1)
        assert _core.num_threads() == 1
    finally:
        _core.set_num_threads(before)


def test_stub_matches_the_extension() -> None:
    """``_core.pyi`` lists exactly the extension's functions with the same parameters."""
    stub = (Path(pathflow.__file__).parent / "_core.pyi").read_text()
    stubbed = dict(re.findall(r"^def (\w+)\((.*?)\)\s*->", stub, flags=re.S | re.M))
    public = {
        n
        for n, f in vars(_core).items()
        if callable(f) and not isinstance(f, type) and not n.startswith("_")
    }
    assert set(stubbed) == public
    classes = dict(re.findall(r"^class (\w+):\n((?:    .*\n|\n)*)", stub, flags=re.M))
    assert set(classes) == {n for n, f in vars(_core).items() if isinstance(f, type)}
    for cls, body in classes.items():
        for meth in re.findall(r"^    def (\w+)\(", body, flags=re.M):
            assert hasattr(getattr(_core, cls), meth), f"{cls}.{meth}"
        for attr in re.findall(r"^    (\w+): ", body, flags=re.M):
            assert hasattr(getattr(_core, cls), attr), f"{cls}.{attr}"
    for name, params in stubbed.items():
        stub_names = [p.split(":")[0].split("=")[0].strip() for p in params.split(",") if p.strip()]
        real = list(inspect.signature(getattr(_core, name)).parameters)
        assert stub_names == real, name


_FORK_SCRIPT = """
import multiprocessing as mp
import numpy as np
from pathflow import _core

def count():
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (200, 40, 120)
    binary, _, _ = _core.binary_tissue(img)
    return int((binary > 0).sum())

if __name__ == "__main__":
    parent = count()  # starts the pool in the parent
    with mp.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(count).get(timeout=60)
    print(parent, child)
"""


def test_pool_is_fork_safe(tmp_path: Path) -> None:
    """A forked child (DataLoader worker, multiprocessing) gets a fresh pool, no deadlock.
    Run in a fresh interpreter: forking this test process, which holds other tests'
    threads (I/O pools, event loops), could deadlock for reasons that are not the pool's."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    parent, child = map(int, res.stdout.split())
    assert child == parent > 0
