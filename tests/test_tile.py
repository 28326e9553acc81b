"""``pathflow tile`` end to end on the real sample slides."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from pathflow.cli import main
from PIL import Image


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    out = tmp_path_factory.mktemp("cmu")
    assert run_cli("tile", cmu_path, "--out", out, "-q", "--workers", "1") == 0
    return out


def test_outputs_of_default_preset(cmu_run: Path, cmu_path: Path) -> None:
    sid = "cmu_small_region"
    for rel in (f"coords/{sid}.h5", f"masks/{sid}.png", f"overlays/{sid}.jpg", "manifest.csv",
                "config.yaml"):  # fmt: skip
        assert (cmu_run / rel).is_file(), rel
    (row,) = manifest(cmu_run)
    assert row["status"] == "ok" and row["error"] == ""
    assert float(row["mpp"]) == pytest.approx(0.499)
    # 256 px at 0.5 um/px = round(256 * 0.5 / 0.499) = 257 level-0 px, read at level 0.
    assert row["patch_size_level0"] == "257" and row["patch_level"] == "0"
    n = int(row["patches"])
    assert n == 43
    mask = np.asarray(Image.open(cmu_run / f"masks/{sid}.png"))
    # Mask at 4 um/px: 2220x2967 level-0 px at 0.499 um/px, area-downsampled by 8.
    assert mask.shape == (371, 278) and set(np.unique(mask)) <= {0, 255}
    # The tissue covers ~38% of this crop (see the overlay); manifest area agrees with the mask.
    assert 0.3 < (mask > 0).mean() < 0.5
    slide_mm2 = 2220 * 2967 * (0.499 / 1000) ** 2
    assert float(row["tissue_mm2"]) == pytest.approx((mask > 0).mean() * slide_mm2, rel=1e-3)


def test_coords_read_like_clam(cmu_run: Path, cmu_path: Path) -> None:
    """Open the h5 exactly as CLAM's extract_features_fp / dataset_h5 do."""
    import openslide

    with h5py.File(cmu_run / "coords/cmu_small_region.h5", "r") as f:
        coords = f["coords"][:]
        patch_level = f["coords"].attrs["patch_level"]
        patch_size = f["coords"].attrs["patch_size"]
        attrs = dict(f["coords"].attrs)
        fractions = f["tissue_fraction"][:]
    assert coords.dtype == np.int64 and coords.shape == (43, 2)
    assert attrs["name"] == "cmu_small_region"
    assert tuple(attrs["level_dim"]) == (2220, 2967)
    assert tuple(attrs["downsample"]) == (1.0, 1.0)
    assert attrs["target_patch_size"] == 256 and attrs["target_mpp"] == 0.5
    assert attrs["mpp"] == pytest.approx(0.499)
    # Slide-aligned grid, every patch inside the slide, unique, row-major.
    assert (coords % 257 == 0).all()
    assert (coords[:, 0] + 257 <= 2220).all() and (coords[:, 1] + 257 <= 2967).all()
    assert len({tuple(c) for c in coords.tolist()}) == len(coords)
    assert fractions.shape == (43,) and (fractions > 0).all() and fractions.max() == 1.0
    wsi = openslide.OpenSlide(str(cmu_path))
    x, y = (int(v) for v in coords[len(coords) // 2])
    img = wsi.read_region((x, y), int(patch_level), (int(patch_size),) * 2).convert("RGB")
    assert img.size == (257, 257)
    # A patch in the middle of the tissue is not background.
    assert np.asarray(img).mean() < 220


def test_rerun_resumes_without_redoing(cmu_run: Path, cmu_path: Path) -> None:
    h5 = cmu_run / "coords/cmu_small_region.h5"
    before = h5.stat().st_mtime_ns
    assert run_cli("tile", cmu_path, "--out", cmu_run, "-q", "--workers", "1") == 0
    (row,) = manifest(cmu_run)
    assert row["resumed"] == "True" and row["patches"] == "43" and row["status"] == "ok"
    assert h5.stat().st_mtime_ns == before


def test_interrupted_run_leaves_no_final_file_and_completes(tmp_path: Path, cmu_path: Path) -> None:
    out = tmp_path / "out"
    # A crash mid-write leaves only hidden temporaries, never a final-named partial file.
    (out / "coords").mkdir(parents=True)
    (out / "coords" / ".cmu_small_region.h5.abc.tmp").write_bytes(b"\x89HDF partial")
    (out / "masks").mkdir()
    (out / "masks" / "cmu_small_region.png").write_bytes(b"stale")
    assert run_cli("tile", cmu_path, "--out", out, "-q", "--workers", "1") == 0
    (row,) = manifest(out)
    assert row["status"] == "ok" and row["resumed"] == "False" and row["patches"] == "43"
    assert Image.open(out / "masks" / "cmu_small_region.png").size == (278, 371)


def test_bad_slides_fail_alone(
    tmp_path: Path, cmu_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.svs").write_text("this is not a slide\n")
    (bad / "truncated.svs").write_bytes(cmu_path.read_bytes()[:100_000])
    shutil.copy(cmu_path, bad / "good.svs")
    out = tmp_path / "out"
    rc = run_cli("tile", bad, tmp_path / "missing.svs", "--out", out, "-q", "--workers", "2")
    assert rc == 1
    rows = {r["slide"]: r for r in manifest(out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["patches"] == "43"
    assert rows["notes"]["status"] == "failed"
    assert "not a supported slide format" in rows["notes"]["error"]
    assert rows["truncated"]["status"] == "failed" and "truncated" in rows["truncated"]["error"]
    assert rows["missing"]["status"] == "failed" and "not found" in rows["missing"]["error"]
    for r in rows.values():
        assert "\n" not in r["error"]
        if r["status"] == "failed":
            assert r["slide"] in r["error"]
    err = capsys.readouterr().err
    assert err.count("FAILED") == 3
    assert not (out / "coords" / "notes.h5").exists()


def test_blank_slide_is_a_warning_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((1200, 1600, 3), 245, np.uint8)).save(blank)
    out = tmp_path / "out"
    assert run_cli("tile", blank, "--slide-mpp", "0.5", "--out", out, "-q") == 0
    (row,) = manifest(out)
    assert row["status"] == "no_tissue" and row["patches"] == "0"
    with h5py.File(out / "coords" / "blank.h5") as f:
        assert f["coords"].shape == (0, 2)
    assert "no tissue found" in capsys.readouterr().err


def test_implausible_mpp_needs_override(tmp_path: Path, pyramid_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("tile", pyramid_path, "--out", out, "-q") == 1
    (row,) = manifest(out)
    assert "implausible mpp 896" in row["error"] and "--slide-mpp" in row["error"]
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nslide.tiff,2.0\n")
    assert run_cli("tile", pyramid_path, "--out", out, "-q", "--slide-mpp-csv", table) == 0
    (row,) = manifest(out)
    assert row["status"] == "ok" and float(row["mpp"]) == 2.0 and int(row["patches"]) > 0


def test_yaml_config_and_cli_override(tmp_path: Path, cmu_path: Path) -> None:
    cfg = tmp_path / "tile.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "clam", "a_t": 1, "patch": 128, "overlay": False}))
    out = tmp_path / "out"
    assert run_cli("tile", cmu_path, "--config", cfg, "--patch", "256", "--out", out, "-q") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["preset"] == "clam" and saved["a_t"] == 1.0 and saved["patch"] == 256
    assert saved["layout"] == "clam" and saved["area_unit"] == "patch512" and saved["mpp"] is None
    assert not (out / "overlays").exists()
    with h5py.File(out / "coords" / "cmu_small_region.h5") as f:
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0


def test_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: clam\nsthresold: 3\n")
    assert run_cli("tile", "x.svs", "--config", cfg) == 2
    assert "unknown option 'sthresold'" in capsys.readouterr().err
    assert run_cli("tile", "x.svs", "--mthresh", "4") == 2
    assert "mthresh must be an odd number" in capsys.readouterr().err


def test_pen_ink_is_excluded(tmp_path: Path, ink_path: Path) -> None:
    from pathflow import _core

    rgb = np.asarray(Image.open(ink_path).convert("RGB"))
    ink = _core.ink_mask(rgb) > 0
    results = {}
    for flag in ("--no-remove-ink", "--remove-ink"):
        out = tmp_path / flag
        args = ("tile", ink_path, "--slide-mpp", "2", "--seg-mpp", "2", "--out", out, "-q", flag)
        assert run_cli(*args) == 0
        mask = np.asarray(Image.open(out / "masks" / "slide_with_ink.png")) > 0
        assert mask.shape == rgb.shape[:2]
        results[flag] = (mask & ink).sum() / ink.sum()
    # The marker (~1.3% of the image) is mostly inside the tissue mask without removal ...
    assert ink.mean() > 0.005
    assert results["--no-remove-ink"] > 0.5
    # ... and gone with it.
    assert results["--remove-ink"] < 0.02


def test_bring_your_own_masks(tmp_path: Path, cmu_path: Path, cmu_run: Path) -> None:
    # PNG: the mask of a previous run gives back the same coordinates (as the tissue, or
    # intersected with the detected tissue it came from).
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(cmu_run / "masks" / "cmu_small_region.png", masks / "cmu_small_region.png")
    for mode, source in (("replace", "png"), ("intersect", "segmentation&png")):
        out = tmp_path / f"png-{mode}"
        args = ("--mask", masks, "--mask-mode", mode)
        assert run_cli("tile", cmu_path, *args, "--out", out, "-q") == 0
        with (
            h5py.File(out / "coords/cmu_small_region.h5") as a,
            h5py.File(cmu_run / "coords/cmu_small_region.h5") as b,
        ):
            assert np.array_equal(a["coords"][:], b["coords"][:])
            assert a["coords"].attrs["mask_source"] == source
    # GeoJSON: one square of 1000x1000 level-0 px at (514, 514) with a hole.
    square = [[514, 514], [1514, 514], [1514, 1514], [514, 1514], [514, 514]]
    hole = [[900, 900], [1100, 900], [1100, 1100], [900, 1100], [900, 900]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square, hole]}}
    gj = tmp_path / "roi.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    out = tmp_path / "gj"
    args = ("--mask-mode", "replace", "--min-tissue", "0.99")  # the square is the tissue
    assert run_cli("tile", cmu_path, "--mask", gj, "--out", out, "-q", *args) == 0
    with h5py.File(out / "coords/cmu_small_region.h5") as f:
        coords = f["coords"][:]
        frac = f["tissue_fraction"][:]
    # Patches of 257 fully inside [514, 1514]: x, y in {514, 771, 1028} minus those whose
    # footprint overlaps the hole [900, 1100]: only corners remain... grid starts at 0:
    expected = [(x, y) for y in range(0, 2967, 257) for x in range(0, 2220, 257)
                if x >= 514 and x + 257 <= 1515 and y >= 514 and y + 257 <= 1515
                and not (x < 1100 and x + 257 > 900 and y < 1100 and y + 257 > 900)]  # fmt: skip
    assert sorted(map(tuple, coords.tolist())) == sorted(expected)
    assert (frac >= 0.99).all()
    missing = tmp_path / "nomask"
    missing.mkdir()
    assert run_cli("tile", cmu_path, "--mask", missing, "--out", tmp_path / "o3", "-q") == 1


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom pathflow.cli import main\n"
        "try:\n    main(['tile', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'h5py', 'openslide', 'PIL', 'pathflow._core') "
        "if m in sys.modules]\nassert not heavy, heavy\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert res.returncode == 0, res.stderr
    assert "--a-t" in res.stdout and "--remove-ink" in res.stdout
