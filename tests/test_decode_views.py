"""``_core.image_info`` / ``_core.decode_views`` against PIL on real H&E patches."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pathflow import _core
from pathflow.cli import main
from pathflow.exceptions import InvalidArgumentError
from PIL import Image


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> list[bytes]:
    """The 43 real 256-px JPEG patches of ``pathflow tile --sample cmu-small --shards``."""
    out = tmp_path_factory.mktemp("decode_views")
    assert main(["tile", str(cmu_path), "--out", str(out), "--shards", "-q"]) == 0
    data = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                f = tf.extractfile(m)
                if m.name.endswith(".jpg") and f is not None:
                    data.append(f.read())
    assert len(data) >= 40
    return data


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def random_boxes(
    rng: np.random.Generator, n: int, v: int, size: tuple[int, int], scale: tuple[float, float]
) -> np.ndarray:
    """RandomResizedCrop-style boxes (x0, y0, w, h) inside a (width, height) image."""
    width, height = size
    area = rng.uniform(*scale, (n, v)) * width * height
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (n, v)))
    w = np.clip(np.sqrt(area * ratio), 1, width)
    h = np.clip(np.sqrt(area / ratio), 1, height)
    x0 = rng.uniform(0, 1, (n, v)) * (width - w)
    y0 = rng.uniform(0, 1, (n, v)) * (height - h)
    return np.stack([x0, y0, w, h], -1).astype(np.float32)


def full_boxes(sizes: list[tuple[int, int]]) -> np.ndarray:
    return np.array([[[0, 0, w, h]] for w, h in sizes], np.float32)


def pil_view(img: Image.Image, box: np.ndarray, size: int) -> np.ndarray:
    x0, y0, w, h = (float(v) for v in box)
    return np.asarray(
        img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    )


def d4_numpy(a: np.ndarray, code: int) -> np.ndarray:
    if code & 1:
        a = np.transpose(a, (1, 0, 2))
    if code & 2:
        a = a[:, ::-1]
    if code & 4:
        a = a[::-1]
    return a


def test_image_info_agrees_with_pil(jpegs: list[bytes]) -> None:
    base = Image.open(io.BytesIO(jpegs[0])).convert("RGB").crop((0, 0, 200, 120))
    pngs = [encode(base.convert(m), "PNG") for m in ("RGB", "RGBA", "L", "LA")]
    gray = encode(base.convert("L"), "JPEG", quality=90)
    data = [*jpegs, *pngs, gray, jpegs[1] + b"\0\0\0"]
    sizes, reasons = _core.image_info(data)
    assert sizes.dtype == np.int32 and sizes.shape == (len(data), 2)
    assert reasons == [None] * len(data)
    for d, (w, h) in zip(data, sizes, strict=True):
        assert Image.open(io.BytesIO(d)).size == (w, h)


def test_image_info_reports_corrupt_data(jpegs: list[bytes]) -> None:
    png = encode(Image.open(io.BytesIO(jpegs[0])), "PNG")
    bad = [
        jpegs[0][: len(jpegs[0]) // 2],
        jpegs[0][:-2],
        png[:-5],
        np.random.default_rng(0).bytes(5000),
        b"",
        encode(Image.open(io.BytesIO(jpegs[0])).convert("CMYK"), "JPEG"),
        encode(Image.open(io.BytesIO(jpegs[0])).convert("P"), "PNG"),  # 8-bit palette
    ]
    sizes, reasons = _core.image_info([jpegs[1], *bad])
    assert reasons[0] is None and tuple(sizes[0]) == (256, 256)
    assert not sizes[1:].any()
    assert all(isinstance(r, str) and r for r in reasons[1:])
    assert reasons[1] == reasons[2] == "truncated JPEG: no EOI marker"
    assert "PNG" in str(reasons[3])
    assert reasons[4] == "not a JPEG, PNG or WebP"
    assert reasons[5] == "empty image data"
    assert "4 components" in str(reasons[6])
    assert "colour type 3" in str(reasons[7])


def test_decode_matches_pil(jpegs: list[bytes]) -> None:
    """Full image at native size = the decoded pixels: same libjpeg-turbo output as PIL."""
    base = Image.open(io.BytesIO(jpegs[0]))
    extra = [
        encode(base.convert("L"), "JPEG", quality=85),
        encode(base, "JPEG", quality=75, subsampling=2),  # 4:2:0 chroma
        encode(base, "JPEG", quality=90, progressive=True),
        *(encode(base.convert(m), "PNG") for m in ("RGB", "RGBA", "L", "LA")),
    ]
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    extra.append(encode(rgba, "PNG"))  # alpha dropped, not composited (PIL convert("RGB"))
    data = jpegs + extra
    sizes, _ = _core.image_info(data)
    boxes = full_boxes([(int(w), int(h)) for w, h in sizes])
    outs, ok, reasons = _core.decode_views(
        data, [boxes], [256], [np.zeros((len(data), 1), np.uint8)]
    )
    assert ok.all() and reasons == [None] * len(data)
    assert outs[0].shape == (len(data), 1, 256, 256, 3) and outs[0].dtype == np.uint8
    for d, got in zip(data, outs[0][:, 0], strict=True):
        ref = pil_rgb(d)
        assert np.abs(got.astype(int) - ref).max() <= 1
    exact = sum(np.array_equal(got, pil_rgb(d)) for d, got in zip(data, outs[0][:, 0], strict=True))
    assert exact == len(data)


@pytest.mark.parametrize(
    ("size", "scale"), [(224, (0.14, 1.0)), (96, (0.05, 0.4)), (320, (0.3, 1.0)), (17, (0.01, 1.0))]
)
def test_crop_resize_matches_pil_bilinear(
    jpegs: list[bytes], size: int, scale: tuple[float, float]
) -> None:
    rng = np.random.default_rng(size)
    n, v = len(jpegs), 3
    boxes = random_boxes(rng, n, v, (256, 256), scale)
    boxes[0, 0] = (0, 0, 256, 256)
    boxes[1, 0] = (0.25, 17.5, 255.75, 238.5)  # touching the far edges
    outs, ok, _ = _core.decode_views(jpegs, [boxes], [size], [np.zeros((n, v), np.uint8)])
    assert ok.all()
    worst, means = 0, []
    for i, d in enumerate(jpegs):
        img = Image.open(io.BytesIO(d)).convert("RGB")
        for j in range(v):
            diff = np.abs(outs[0][i, j].astype(int) - pil_view(img, boxes[i, j], size))
            worst = max(worst, int(diff.max()))
            means.append(diff.mean())
    assert worst <= 2
    assert np.mean(means) < 0.5 and max(means) < 0.5


def test_d4_codes_equal_numpy_composition(jpegs: list[bytes]) -> None:
    n = 6
    box = np.array([13.3, 40.8, 180.6, 150.2], np.float32)
    boxes = np.broadcast_to(box, (n, 9, 4)).copy()
    codes = np.broadcast_to(np.array([0, *range(8)], np.uint8), (n, 9)).copy()
    outs, ok, _ = _core.decode_views(jpegs[:n], [boxes], [64], [codes])
    assert ok.all()
    for i in range(n):
        plain = outs[0][i, 0]
        for code in range(8):
            assert np.array_equal(outs[0][i, code + 1], d4_numpy(plain, code)), code
    # Distinct codes give distinct images on real tissue.
    assert len({outs[0][0, c].tobytes() for c in range(1, 9)}) == 8


def test_view_groups_are_independent(jpegs: list[bytes]) -> None:
    """2 x 224 + 8 x 96 in one call equals each group alone; threads do not change a byte."""
    rng = np.random.default_rng(1)
    n = len(jpegs)
    g1, g2 = (
        random_boxes(rng, n, 2, (256, 256), (0.14, 1)),
        random_boxes(rng, n, 8, (256, 256), (0.05, 0.4)),
    )
    c1, c2 = rng.integers(0, 8, (n, 2), np.uint8), rng.integers(0, 8, (n, 8), np.uint8)
    (a, b), ok, _ = _core.decode_views(jpegs, [g1, g2], [224, 96], [c1, c2])
    assert ok.all() and a.shape == (n, 2, 224, 224, 3) and b.shape == (n, 8, 96, 96, 3)
    assert np.array_equal(_core.decode_views(jpegs, [g1], [224], [c1])[0][0], a)
    assert np.array_equal(_core.decode_views(jpegs, [g2], [96], [c2])[0][0], b)
    before = _core.num_threads()
    try:
        _core.set_num_threads(1)
        (a1, b1), _, _ = _core.decode_views(jpegs, [g1, g2], [224, 96], [c1, c2])
    finally:
        _core.set_num_threads(before)
    assert np.array_equal(a1, a) and np.array_equal(b1, b)
    # No groups, no views, no images.
    outs, ok, reasons = _core.decode_views(jpegs[:3], [], [], [])
    assert outs == [] and ok.all() and reasons == [None] * 3
    empty = np.zeros((3, 0, 4), np.float32)
    outs, ok, _ = _core.decode_views(jpegs[:3], [empty], [8], [np.zeros((3, 0), np.uint8)])
    assert outs[0].shape == (3, 0, 8, 8, 3) and ok.all()
    outs, ok, _ = _core.decode_views(
        [], [np.zeros((0, 2, 4), np.float32)], [8], [np.zeros((0, 2), np.uint8)]
    )
    assert outs[0].shape == (0, 2, 8, 8, 3) and ok.shape == (0,)


def test_bad_samples_fail_alone(jpegs: list[bytes]) -> None:
    good = jpegs[:3]
    bad = [
        good[0][: len(good[0]) * 2 // 3],  # truncated
        np.random.default_rng(0).bytes(4096),  # noise
        b"",
        b"\xff\xd8\xff\xe0",  # a JPEG that stops in its header
    ]
    data = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]
    n = len(data)
    boxes = np.broadcast_to(np.array([8, 8, 200, 200], np.float32), (n, 2, 4)).copy()
    codes = np.tile(np.array([0, 5], np.uint8), (n, 1))
    outs, ok, reasons = _core.decode_views(data, [boxes], [32], [codes])
    assert ok.tolist() == [True, False, True, False, False, True, False]
    for i in range(n):
        assert (reasons[i] is None) == bool(ok[i])
        if not ok[i]:
            assert isinstance(reasons[i], str) and reasons[i]
            assert not outs[0][i].any()
    assert reasons[1] == "truncated JPEG: no EOI marker"
    assert reasons[3] == "not a JPEG, PNG or WebP"
    assert reasons[4] == "empty image data"
    alone, _, _ = _core.decode_views(good, [boxes[:3]], [32], [codes[:3]])
    assert np.array_equal(outs[0][[0, 2, 5]], alone[0])


def test_argument_mistakes_raise(jpegs: list[bytes]) -> None:
    data = jpegs[:2]
    ok_boxes = np.array([[[0, 0, 256, 256]]] * 2, np.float32)
    codes = np.zeros((2, 1), np.uint8)

    def call(boxes: np.ndarray = ok_boxes, size: int = 16, d4: np.ndarray = codes) -> None:
        _core.decode_views(data, [boxes], [size], [d4])

    call()
    # Rounding slop at the far edge is clamped, not an error.
    call(np.array([[[0, 0, 256.0005, 256]]] * 2, np.float32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        call(ok_boxes[:1])  # N mismatch
    with pytest.raises(InvalidArgumentError, match="shape"):
        call(ok_boxes[..., :3])
    with pytest.raises(InvalidArgumentError, match="shape"):
        call(d4=np.zeros((2, 2), np.uint8))
    with pytest.raises(InvalidArgumentError, match="> 0"):
        call(size=0)
    with pytest.raises(InvalidArgumentError, match="code 8"):
        call(d4=np.full((2, 1), 8, np.uint8))
    for box in (
        [0, 0, 256.5, 256],
        [-1, 0, 10, 10],
        [250, 250, 10, 10],
        [0, 0, 0, 5],
        [np.nan, 0, 5, 5],
    ):
        with pytest.raises(InvalidArgumentError, match="image 1: box"):
            call(np.array([[[0, 0, 8, 8]], [box]], np.float32))
    with pytest.raises(InvalidArgumentError, match="per view group"):
        _core.decode_views(data, [ok_boxes], [16, 16], [codes])
    # A box is only checked against an image that could be read: a corrupt sample fails alone.
    _, ok, _ = _core.decode_views(
        [data[0], b"junk"], [np.array([[[0, 0, 8, 8]], [[0, 0, 999, 9]]], np.float32)], [8], [codes]
    )
    assert ok.tolist() == [True, False]
