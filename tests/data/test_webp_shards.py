"""``pathflow tile --shards --format webp`` shards through the loaders and the extract decoder.

The shards of the real ``cmu-small`` sample hold lossless WebP patches; every path that reads
them (Rust header check and decode of the torch backend, DALI's CPU decoder, the decoder of
``pathflow extract``) must give PIL's (libwebp's) pixels.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

torch = pytest.importorskip("torch")

from pathflow import _core  # noqa: E402
from pathflow.cli import main  # noqa: E402
from pathflow.data import ShardSet, ViewSpec, ViewsSpec, make_loader  # noqa: E402
from pathflow.data.shardset import scan_tar  # noqa: E402
from pathflow.extract.decode import decode_resize  # noqa: E402
from PIL import Image  # noqa: E402

# The whole patch at its native size, no flip: the loader's output is the decoded image.
NATIVE = ViewsSpec((ViewSpec(size=256, crop="full", hflip=0.0),), name="native")


@pytest.fixture(scope="module")
def webp_shards(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    """``pathflow tile --shards --format webp`` of cmu-small (43 patches), in a child process
    like tests/test_extract.py: cuCIM's import can hang once a CUDA build of torch is loaded."""
    out = tmp_path_factory.mktemp("webp_shards")
    cmd = [sys.executable, "-m", "pathflow", "tile", str(cmu_path), "--out", str(out)]
    cmd += ["--shards", "--format", "webp", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out / "shards"


def pil_rgb(data: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "WEBP"
        return np.asarray(im.convert("RGB"))


def loader_images(
    shards: Path, views: str | ViewsSpec, backend: str
) -> tuple[list[str], npt.NDArray[np.uint8]]:
    loader = make_loader(
        shards,
        views=views,
        batch_size=8,
        backend=backend,
        device="cpu",
        num_workers=0,
        output="uint8",
        shuffle=False,
        drop_last=False,
    )
    keys: list[str] = []
    images = []
    for batch in loader:
        keys += batch.meta["key"]
        images.append(batch.views[0].permute(0, 2, 3, 1).cpu().numpy())
    assert loader.stats["skipped"] == 0
    return keys, np.concatenate(images)


def reference(shards: Path, keys: list[str]) -> dict[str, bytes]:
    ss = ShardSet(shards)
    images, metas = ss.read(np.arange(len(ss)))
    by_key = {m["key"]: b for m, b in zip(metas, images, strict=True)}
    assert sorted(by_key) == sorted(keys)
    return by_key


def test_shards_hold_webp_samples(webp_shards: Path) -> None:
    info = json.loads((webp_shards / "shards.json").read_text())
    assert info["image_ext"] == "webp"
    tars = sorted(webp_shards.glob("*.tar"))
    with tarfile.open(tars[0]) as tf:
        names = tf.getnames()
    assert any(n.endswith(".webp") for n in names) and not any(n.endswith(".jpg") for n in names)
    ss = ShardSet(webp_shards)
    assert len(ss) == 43  # every sample indexed, from the DALI .idx ...
    scanned = sum(len(scan_tar(t)) for t in tars)  # ... and from a scan of the tar headers
    assert scanned == 43
    images, _ = ss.read(np.arange(len(ss)))
    sizes, errors = _core.image_info(images)
    assert errors == [None] * 43 and (sizes == 256).all()
    # Truncated or foreign data is still refused by the header check.
    _, bad = _core.image_info([images[0][:-10], images[0][:20], b"RIFF\0\0\0\0WAVEfmt "])
    assert bad[0] is not None and bad[0].startswith("truncated WebP")
    assert bad[1] is not None and "WebP" in bad[1]
    assert bad[2] == "not a JPEG, PNG or WebP"


def test_torch_backend_decodes_webp_exactly(webp_shards: Path) -> None:
    keys, got = loader_images(webp_shards, NATIVE, "torch")
    data = reference(webp_shards, keys)
    assert got.shape == (43, 256, 256, 3)
    for key, img in zip(keys, got, strict=True):
        # Lossless WebP decoded by the Rust core: exactly libwebp's pixels.
        np.testing.assert_array_equal(img, pil_rgb(data[key]), err_msg=key)


def test_torch_backend_eval_views_match_pil(webp_shards: Path) -> None:
    keys, got = loader_images(webp_shards, "eval", "torch")
    data = reference(webp_shards, keys)
    assert got.shape == (43, 224, 224, 3)
    for key, img in zip(keys, got, strict=True):
        ref = Image.fromarray(pil_rgb(data[key])).resize((224, 224), Image.Resampling.BILINEAR)
        diff = np.abs(img.astype(int) - np.asarray(ref, int))
        assert diff.max() <= 1 and diff.mean() < 0.5, key  # resize rounding only


def test_dali_cpu_backend_decodes_webp(webp_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    keys, got = loader_images(webp_shards, NATIVE, "dali")
    data = reference(webp_shards, keys)
    for key, img in zip(keys, got, strict=True):
        np.testing.assert_array_equal(img, pil_rgb(data[key]), err_msg=key)


def test_extract_decoder_reads_webp(webp_shards: Path) -> None:
    ss = ShardSet(webp_shards)
    images, _ = ss.read(np.arange(8))
    batch = decode_resize(images, 160)
    assert batch.ok.all() and batch.reasons == [None] * 8
    for data, img in zip(images, batch.images, strict=True):
        ref = Image.fromarray(pil_rgb(data)).resize((160, 160), Image.Resampling.BILINEAR)
        assert np.abs(img.astype(int) - np.asarray(ref, int)).max() <= 1


def test_extract_cli_over_webp_shards(webp_shards: Path, tmp_path: Path) -> None:
    import h5py

    out = tmp_path / "feats"
    argv = ["extract", str(webp_shards), "--arch", "test_vit", "--out", str(out), "-q"]
    assert main(argv) == 0
    with h5py.File(out / "features" / "cmu_small_region.h5") as f:
        assert f["features"].shape == (43, 64) and f["coords"].shape == (43, 2)
        assert f.attrs["num_skipped"] == 0
