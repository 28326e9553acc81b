"""HIPT regions honour ``--format``: the stored bytes are what their names say, and lossless
sub-patches are exactly the region's pixels (issue: PNG names over JPEG q90 bytes)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pathflow.cli import main
from PIL import Image

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff", "webp": b"RIFF"}


def _samples(sdir: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for t in sorted(sdir.glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m)
                assert data is not None
                out.setdefault(key, {})[ext] = data.read()
    return out


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_region_sub_patches_are_stored_in_the_requested_format(
    tmp_path: Path, cmu_path: Path, fmt: str
) -> None:
    out = tmp_path / "out"
    args = ["tile", str(cmu_path), "--out", str(out), "--shards", "--region", "512",
            "--region-patches", "--region-patch", "256", "--mpp", "0.5", "--format", fmt,
            "-q"]  # fmt: skip
    assert main(args) == 0
    samples = _samples(out / "shards")
    assert samples
    subs = [f"p{i:03d}.{fmt}" for i in range(4)]
    for files in samples.values():
        assert set(files) == {fmt, "json", *subs}
        for name in (fmt, *subs):
            assert files[name].startswith(MAGIC[fmt]), (name, files[name][:8])
            if fmt == "webp":
                assert files[name][8:12] == b"WEBP"
        region = np.asarray(Image.open(io.BytesIO(files[fmt])).convert("RGB"))
        assert region.shape == (512, 512, 3)
        meta = json.loads(files["json"])
        assert meta["sub_patch_size"] == 256
        if fmt == "png":  # lossless: each sub-patch is exactly its quarter of the region
            for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                sub = np.asarray(Image.open(io.BytesIO(files[subs[i]])).convert("RGB"))
                want = region[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                np.testing.assert_array_equal(sub, want)


@pytest.mark.parametrize("sample", ["cmu_path", "ink_path"])
def test_slide_sources_encode_regions_in_the_requested_format(
    sample: str, request: pytest.FixtureRequest
) -> None:
    """The sources ``pathflow extract --model regions|hipt --patch-format png`` reads from
    (a tiled SVS through the Rust TIFF reader, a flat JPEG through the slide readers) return
    PNG regions and sub-patches whose pixels are the region's own."""
    from pathflow.tiling.sources import PatchSpec, open_source

    path: Path = request.getfixturevalue(sample)
    spec = PatchSpec(read_level=0, read_size=512, out_size=512, format="png", sub_size=256)
    src = open_source(path, "auto", spec, "auto", threads=2)
    try:
        (parts,) = src.produce(np.array([[0, 0]], dtype=np.int64))
    finally:
        src.close()
    assert not isinstance(parts, str), parts
    assert len(parts) == 5 and all(p.startswith(MAGIC["png"]) for p in parts)
    region = np.asarray(Image.open(io.BytesIO(parts[0])).convert("RGB"))
    last = np.asarray(Image.open(io.BytesIO(parts[4])).convert("RGB"))
    np.testing.assert_array_equal(last, region[256:, 256:])
