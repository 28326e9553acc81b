"""A slide reader added from one file (a class plus one ``register_backend`` line) is reached by
``open_slide(backend=...)`` and by ``pathflow tile --backend``, and reads real pixels."""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pathflow.slide as slide_pkg
import pytest
from PIL import Image

TOY = '''
"""Toy slide reader: a flat image file (any Pillow format) named ``*.toy``, one level."""
import numpy as np
from PIL import Image

from pathflow.slide import register_backend
from pathflow.slide.base import SlideReader


class ToyReader(SlideReader):
    backend = "toy"
    package = "pillow"

    @classmethod
    def can_open(cls, path, kind):
        return path.suffix == ".toy"

    def __init__(self, path, *, mpp=None):
        super().__init__(path, mpp=mpp)
        with Image.open(self.path) as im:
            self._rgb = np.asarray(im.convert("RGB"))
        h, w = self._rgb.shape[:2]
        self._set_metadata(level_dimensions=[(w, h)], level_downsamples=[1.0],
                           properties={"toy.format": "png"}, file_mpp=None, magnification=None)

    def _read_region(self, location, level, size):
        (x, y), (w, h) = location, size
        H, W = self._rgb.shape[:2]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 < x1 and y0 < y1:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def _close(self):
        self._rgb = None


register_backend("toy", ToyReader)
'''


@pytest.fixture
def toy_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Import the toy plug-in from its own file; the registry is restored afterwards."""
    monkeypatch.setattr(slide_pkg, "_REGISTRY", dict(slide_pkg._REGISTRY))
    path = tmp_path / "toy_slide_reader.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_slide_reader", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_slide_reader", module)
    spec.loader.exec_module(module)
    yield


@pytest.fixture
def toy_slide(tmp_path: Path, cmu_rgb: np.ndarray) -> Path:
    """cmu-small's level 0 (decoded by OpenSlide) as a lossless PNG named ``.toy``."""
    path = tmp_path / "slides" / "cmu_small_region.toy"
    path.parent.mkdir()
    Image.fromarray(cmu_rgb).save(path, format="PNG")
    return path


def test_toy_reader_from_one_file_reads_real_pixels(
    toy_reader: None, toy_slide: Path, cmu_rgb: np.ndarray
) -> None:
    assert "toy" in slide_pkg.list_backends()
    assert "toy" in slide_pkg.list_backends(available_only=True)
    with slide_pkg.open_slide(toy_slide, backend="toy", mpp=0.499) as s:
        assert s.backend == "toy" and s.mpp == 0.499 and s.file_mpp is None
        assert s.dimensions == (2220, 2967) == cmu_rgb.shape[1::-1]
        np.testing.assert_array_equal(
            s.read_region((1000, 1200), 0, (300, 200)), cmu_rgb[1200:1400, 1000:1300]
        )
        edge = s.read_region((2200, 2950), 0, (40, 30))  # past the right and bottom edges
        np.testing.assert_array_equal(edge[:17, :20], cmu_rgb[2950:, 2200:])
        assert (edge[17:] == 255).all() and (edge[:, 20:] == 255).all()


def test_unknown_slide_backend_lists_the_registered_ones(toy_reader: None, toy_slide: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown slide backend 'nope'.*\btoy\b"):
        slide_pkg.open_slide(toy_slide, backend="nope")


def _coords(out: Path, backend: str) -> np.ndarray:
    with h5py.File(out / "coords" / "cmu_small_region.h5", "r") as f:
        assert f["coords"].attrs["backend"] == backend
        return np.asarray(f["coords"][:])


def _manifest(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    return row


def test_tile_cli_reaches_the_toy_reader(
    toy_reader: None, toy_slide: Path, cmu_path: Path, tmp_path: Path
) -> None:
    """``pathflow tile --backend toy`` on the PNG copy gives the same patches as OpenSlide on
    the original slide (same pixels, same mpp)."""
    from pathflow.cli import main

    common = ["--slide-mpp", "0.499", "-q", "--workers", "1"]
    toy_out, ref_out = tmp_path / "toy", tmp_path / "ref"
    assert main(["tile", str(toy_slide), "--backend", "toy", "--out", str(toy_out), *common]) == 0
    assert main(["tile", str(cmu_path), "--backend", "openslide", "--out", str(ref_out)]) == 0
    row = _manifest(toy_out)
    assert row["status"] == "ok" and row["patches"] == "43"
    assert float(row["mpp"]) == pytest.approx(0.499)
    ref = _coords(ref_out, "openslide")
    assert ref.shape == (43, 2)
    np.testing.assert_array_equal(_coords(toy_out, "toy"), ref)


def test_base_still_exports_what_it_held_before_the_split() -> None:
    """``slide/base.py`` became the reader ABC; its helpers moved to sniff/mpp/pixels and keep
    their old import path."""
    import pathflow.slide.base as base
    from pathflow.slide import mpp, pixels, sniff

    moved = {
        mpp: ("MPP_MAX", "MPP_MIN", "check_mpp_override", "load_mpp_csv", "lookup_mpp",
              "mean_mpp", "resolve_mpp"),
        sniff: ("sniff_format", "tiff_header_problem", "tiff_resolution_mpp"),
        pixels: ("composite_on_white", "level_origin", "region_overlaps", "to_rgb_uint8",
                 "white", "whiten_outside"),
    }  # fmt: skip
    for module, names in moved.items():
        for name in names:
            assert getattr(base, name) is getattr(module, name), name
    assert base.MPP_MIN == 0.05 and base.MPP_MAX == 20.0
